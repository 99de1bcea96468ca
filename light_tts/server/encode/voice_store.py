"""Registered voices on disk, in the instance directory, so that an encode process restarted by
--health_monitor (or a second encode process started later) gets them back: without it a stage
restart silently forgot every POST /voices.

One file per voice, named by a hash of its id (the id is user input and never becomes a path),
written to a temporary name and renamed into place, so a crash mid-write leaves no half file. The
instance directory is the backend's private IPC directory (0700, removed at exit): the voices live
as long as the instance, like the in-memory registry they back.
"""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from light_tts.frontend.voice_cache import Voice

log = logging.getLogger("lighttts")

FIELDS = ("prompt_text_ids", "speech_tokens", "embedding", "prompt_feat")


class VoiceStore:
    def __init__(self, root: str):
        self.dir = os.path.join(root, "voices")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def path(self, voice_id: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(voice_id.encode("utf-8")).hexdigest() + ".npz")

    def save(self, voice_id: str, voice: Voice) -> None:
        path = self.path(voice_id)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, voice_id=np.array(voice_id), **{k: getattr(voice, k) for k in FIELDS})
        os.replace(tmp, path)

    def delete(self, voice_id: str) -> None:
        try:
            os.remove(self.path(voice_id))
        except FileNotFoundError:
            pass

    def _dated(self) -> list[tuple[float, str]]:
        """(modification time, file name) of every stored voice, oldest first."""
        dated = []
        for name in os.listdir(self.dir):
            if name.endswith(".npz"):
                try:
                    dated.append((os.path.getmtime(os.path.join(self.dir, name)), name))
                except OSError:   # deleted meanwhile (another encode process handled a DELETE)
                    pass
        return sorted(dated)

    def list(self) -> list[tuple[str, float]]:
        """(voice_id, registered at: seconds since the epoch) of every stored voice, oldest first.
        Reads only each file's id (np.load is lazy); a file unreadable or deleted meanwhile is left out."""
        out = []
        for mtime, name in self._dated():
            try:
                with np.load(os.path.join(self.dir, name), allow_pickle=False) as z:
                    out.append((str(z["voice_id"]), mtime))
            except Exception:  # noqa: BLE001 - being written or deleted: the next listing shows it
                pass
        return out

    def load_all(self, limit: int) -> list[tuple[str, Voice]]:
        """Up to `limit` stored voices, oldest first; an unreadable file is logged and skipped."""
        out = []
        for _, name in self._dated()[:max(0, limit)]:
            try:
                with np.load(os.path.join(self.dir, name), allow_pickle=False) as z:
                    out.append((str(z["voice_id"]), Voice(*(z[k] for k in FIELDS))))
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the stage
                log.warning("registered voice file %s unreadable, skipped: %s", name, e)
        return out
