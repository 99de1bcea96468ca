"""Registered voices on disk: the one record of which voices exist, read by every process that needs one.

Where: `--voice_dir DIR`, a directory every instance of a deployment shares (the start scripts,
gunicorn's run.sh and the k8s manifests set one), so a voice registered through any instance is
usable through all of them and survives restarts. Without the flag, `<instance directory>/voices`:
private to the instance and removed with it at exit, but an encode process restarted by
--health_monitor still gets the voices back.

Layout: one file per voice, `<sha256 of the id>.npz` (the id is user input and never becomes a
path), holding the id itself, the API key's owner tag (never the key) and the encoded arrays.
A registration writes a private temporary file (`.*.tmp`, never listed) and renames it into place:
readers see the old voice or the new one, never half a file, also across instances, since rename
is atomic on one filesystem (NFS included). Two instances registering one id at once: the last
rename wins and both then serve that voice. Deleting unlinks the file; a reader that opened it
first finishes with it, every later lookup misses.

Readers take no lock. An encode process looks a voice up on every request that names one (one
open and fstat, not a directory scan) and keeps what it decoded, keyed by the file's identity
(inode, size, mtime), so a voice replaced or deleted through another instance is seen at once.
Writers (register, delete: the HTTP workers) take an exclusive flock on `DIR/.lock` for the
check-then-write of capacity, quota and ownership, so two instances cannot both take the last
place; where the filesystem has no locks (flock fails) they proceed unlocked and say so once.

Permissions: the directory is created 0700 when missing; an existing one that is world-writable is
refused (anyone could plant or replace voices), as is one this user cannot write.
This module imports numpy only (the HTTP workers use it and never load torch).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from light_tts.server.args import api_keys
from light_tts.server.io_struct import RequestError

log = logging.getLogger("lighttts")

FIELDS = ("prompt_text_ids", "speech_tokens", "embedding", "prompt_feat")
LOCK_NAME = ".lock"
STALE_TMP_SECONDS = 600      # a temporary file this old is a crashed writer's: removed


class VoiceDirError(ValueError):
    """The voice directory cannot be used (one line saying why and what to change)."""


def prepare_dir(path: str) -> str:
    """The absolute path of a usable voice directory, created 0700 if missing; VoiceDirError if it is
    not a directory, is world-writable, or is not writable by this user."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.lexists(path):
        try:
            os.makedirs(path, mode=0o700)
            os.chmod(path, 0o700)   # makedirs' mode goes through the umask
        except FileExistsError:     # another instance made it meanwhile
            pass
        except OSError as e:
            raise VoiceDirError(f"{path}: cannot create it: {e.strerror}") from None
    try:
        st = os.stat(path)
    except OSError as e:
        raise VoiceDirError(f"{path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise VoiceDirError(f"{path}: not a directory")
    if st.st_mode & stat.S_IWOTH:
        raise VoiceDirError(f"{path} is world-writable (mode {stat.S_IMODE(st.st_mode):04o}): anyone on this machine "
                            f"could plant or replace voices; chmod o-w {path} (0700 is what LightTTS creates)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise VoiceDirError(f"{path}: not writable by this user (uid {os.getuid()}); the directory must belong to "
                            f"the user the servers run as")
    return path


def key_quota(args) -> int:
    """Registered voices one API key may hold; 0: no per-key quota. --voice_quota, else a fair share:
    --max_voices divided by the number of keys in --api_key, rounded up (one key or none: 0)."""
    if args.voice_quota is not None:
        return args.voice_quota
    keys = len(api_keys(args.api_key))
    return -(-args.max_voices // keys) if keys > 1 else 0


def owner_of(api_key: str) -> str:
    """The tag a voice registered with this API key carries on disk (a hash: never the key itself)."""
    return "key:" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


@dataclass
class Entry:
    """One stored voice: `voice` is a light_tts.frontend.voice_cache.Voice (None when only listed)."""
    voice_id: str
    owner: str                  # "" when registered without an API key
    registered_at: float        # seconds since the epoch (the file's mtime)
    stamp: tuple                # the file's identity: a changed stamp is a replaced voice
    voice: Any = None


def _stamp(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _missing(e: OSError) -> bool:
    return e.errno in (errno.ENOENT, errno.ESTALE)   # ESTALE: deleted on an NFS server meanwhile


class VoiceStore:
    def __init__(self, directory: str):
        self.dir = prepare_dir(directory)
        self._lock_warned = False
        self._remove_stale_tmp()

    @classmethod
    def for_instance(cls, voice_dir: Optional[str], instance_root: str) -> "VoiceStore":
        """--voice_dir if set, else the instance directory's private `voices/`."""
        return cls(voice_dir or os.path.join(instance_root, "voices"))

    def path(self, voice_id: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(voice_id.encode("utf-8")).hexdigest() + ".npz")

    # ---- writing (callers hold lock() around check-then-write) -----------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across every process and instance using the directory (flock on DIR/.lock)."""
        fd = os.open(os.path.join(self.dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                if not self._lock_warned:
                    log.warning("voice store %s: no file locks here (%s): registrations proceed unlocked, so "
                                "two at the same moment may both pass the voice limit or quota", self.dir, e)
                    self._lock_warned = True
            yield
        finally:
            os.close(fd)   # releases the lock

    def check_register(self, voice_id: str, owner: str, max_voices: int, quota: Optional[int]) -> None:
        """RequestError unless `owner` ("" without API keys) may store `voice_id` now: 403 if another
        key's voice has that id, 507 if the store holds max_voices voices (a new id), 429 if the owner
        holds `quota` voices (None or 0: no quota). Re-registering one's own id always passes.
        Run it before the costly encode and again under lock() just before save()."""
        entries = self.entries()
        same = next((e for e in entries if e.voice_id == voice_id), None)
        if same is not None and same.owner and owner and same.owner != owner:
            raise RequestError(403, f"voice_id {voice_id!r} was registered with another API key; choose another id")
        if same is None and len(entries) >= max_voices:
            raise RequestError(507, f"{len(entries)} voices are registered, the limit (--max_voices {max_voices}); "
                                    f"delete one with DELETE /voices/{{id}} first")
        if owner and quota and (same is None or same.owner != owner):
            mine = sum(e.owner == owner for e in entries)
            if mine >= quota:
                raise RequestError(429, f"this API key has {mine} voices registered, its quota (--voice_quota "
                                        f"{quota}); delete one of them with DELETE /voices/{{id}} first")

    def check_delete(self, voice_id: str, owner: str) -> None:
        """RequestError 403 if the voice belongs to another API key (unowned voices: anyone)."""
        same = self.get(voice_id, arrays=False)
        if same is not None and same.owner and owner and same.owner != owner:
            raise RequestError(403, f"voice_id {voice_id!r} was registered with another API key")

    def save(self, voice_id: str, voice, owner: str = "") -> None:
        """Write `voice` (anything with the four array attributes of FIELDS) under `voice_id`."""
        path = self.path(voice_id)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".", suffix=".tmp")   # mode 0600, a unique name
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, voice_id=np.array(voice_id), owner=np.array(owner),
                         **{k: np.asarray(getattr(voice, k)) for k in FIELDS})
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        self._sync_dir()

    def delete(self, voice_id: str) -> bool:
        """Remove the voice; False if there was none."""
        try:
            os.remove(self.path(voice_id))
        except OSError as e:
            if _missing(e):
                return False
            raise
        self._sync_dir()
        return True

    def _sync_dir(self) -> None:
        with contextlib.suppress(OSError):   # the rename or unlink outlives a crash of the machine
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for name in self._names(tmp=True):
            with contextlib.suppress(OSError):
                p = os.path.join(self.dir, name)
                if now - os.path.getmtime(p) > STALE_TMP_SECONDS:
                    os.remove(p)

    # ---- reading (no lock) ---------------------------------------------------------------------

    def get(self, voice_id: str, known: Optional[Entry] = None, *, arrays: bool = True) -> Optional[Entry]:
        """The stored voice, or None. `known` (an Entry this process read before) is returned as is
        when the file is still the same one, without reading it again. arrays=False: id, owner and
        time only. A file that is unreadable, or holds another id, is logged and counts as missing."""
        try:
            f = open(self.path(voice_id), "rb")
        except OSError as e:
            if _missing(e):
                return None
            raise
        with f:
            st = os.fstat(f.fileno())
            if known is not None and known.stamp == _stamp(st) and (known.voice is not None or not arrays):
                return known
            entry = self._read(f, st, os.path.basename(f.name), arrays)
        if entry is not None and entry.voice_id != voice_id:
            log.warning("voice file %s holds %r, not %r: ignored", os.path.basename(f.name), entry.voice_id, voice_id)
            return None
        return entry

    def _read(self, f, st: os.stat_result, name: str, arrays: bool) -> Optional[Entry]:
        try:
            with np.load(f, allow_pickle=False) as z:   # lazy: only the members asked for are read
                entry = Entry(str(z["voice_id"]), str(z["owner"]) if "owner" in z.files else "",
                              st.st_mtime, _stamp(st))
                if arrays:
                    from light_tts.frontend.voice_cache import Voice   # torch: only the encode processes get here
                    entry.voice = Voice(*(z[k] for k in FIELDS))
                return entry
        except Exception as e:  # noqa: BLE001 - a damaged file must not fail the caller
            log.warning("registered voice file %s unreadable, skipped: %s", name, e)
            return None

    def _names(self, tmp: bool = False) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except OSError as e:
            log.warning("voice store %s unreadable: %s", self.dir, e)
            return []
        if tmp:
            return [n for n in names if n.startswith(".") and n.endswith(".tmp")]
        return [n for n in names if n.endswith(".npz") and not n.startswith(".")]

    def count(self) -> int:
        """Stored voices (file names only: cheap)."""
        return len(self._names())

    def entries(self, *, arrays: bool = False, limit: Optional[int] = None) -> list[Entry]:
        """Every stored voice, oldest first (up to `limit`); a file deleted meanwhile or unreadable is
        left out, one being written is not there yet (its temporary name is not listed)."""
        out = []
        for name in self._names():
            try:
                f = open(os.path.join(self.dir, name), "rb")
            except OSError:     # deleted meanwhile (another process or instance handled a DELETE)
                continue
            with f:
                entry = self._read(f, os.fstat(f.fileno()), name, arrays=False)
            if entry is not None:
                out.append(entry)
        out.sort(key=lambda e: (e.registered_at, e.voice_id))
        if limit is not None:
            out = out[:max(0, limit)]
        if arrays:
            out = [e for e in (self.get(e.voice_id, arrays=True) for e in out) if e is not None]
        return out

    def list(self) -> list[tuple[str, float]]:
        """(voice_id, registered at: seconds since the epoch) of every stored voice, oldest first."""
        return [(e.voice_id, e.registered_at) for e in self.entries()]

    def load_all(self, limit: int) -> list[tuple[str, Any]]:
        """(voice_id, Voice) of up to `limit` stored voices, oldest first."""
        return [(e.voice_id, e.voice) for e in self.entries(arrays=True, limit=limit)]
