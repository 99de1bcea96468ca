"""Encoded prompts ("voices"): what the encode stage computes once per prompt and reuses.

A voice is the prompt's text token ids, its 25 Hz speech tokens, its 192-d speaker embedding and
its 24 kHz mel (2 frames per token). `VoiceCache` keeps them LRU-bounded by `--cache_capacity`,
keyed by a hash of the uploaded audio bytes and the prompt text, and holds voices registered under
an explicit `voice_id` (POST /voices, or the official `spk2info.pt`) outside the LRU bound.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class Voice:
    prompt_text_ids: np.ndarray    # int32 [Nt]
    speech_tokens: np.ndarray      # int32 [N]
    embedding: np.ndarray          # float32 [192]
    prompt_feat: np.ndarray        # float32 [2N, 80]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.prompt_text_ids, self.speech_tokens, self.embedding, self.prompt_feat))


def upload_key(audio: bytes, prompt_text: str) -> str:
    h = hashlib.sha256(audio)
    h.update(b"\0" + prompt_text.encode("utf-8"))
    return h.hexdigest()


class VoiceCache:
    def __init__(self, capacity: int = 100):
        if capacity < 0:
            raise ValueError("cache capacity must be >= 0")
        self.capacity = capacity
        self._lru: "OrderedDict[str, Voice]" = OrderedDict()
        self._registered: dict[str, Voice] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> Optional[Voice]:
        with self._lock:
            voice = self._lru.get(key)
            if voice is None:
                self.misses += 1
                return None
            self._lru.move_to_end(key)
            self.hits += 1
            return voice

    def put(self, key: str, voice: Voice) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._lru[key] = voice
            self._lru.move_to_end(key)
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)

    def __len__(self) -> int:
        return len(self._lru)

    # registered voices: named by the user, never evicted by the LRU
    def register(self, voice_id: str, voice: Voice) -> None:
        with self._lock:
            self._registered[voice_id] = voice

    def unregister(self, voice_id: str) -> bool:
        with self._lock:
            return self._registered.pop(voice_id, None) is not None

    def voice(self, voice_id: str) -> Optional[Voice]:
        return self._registered.get(voice_id)

    def voice_ids(self) -> list[str]:
        return sorted(self._registered)


def _flat(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy() if dtype == np.float32 else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def load_spk2info(path: str) -> dict[str, Voice]:
    """Read the official `spk2info.pt`: {spk_id: {prompt_text, llm_prompt_speech_token,
    flow_prompt_speech_token, prompt_speech_feat, llm_embedding, flow_embedding, ...}} as written by
    CosyVoice2.add_zero_shot_spk / save_spkinfo. SFT-only entries (just 'embedding') carry no prompt."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of speaker id -> features")
    voices = {}
    for spk_id, info in raw.items():
        if not isinstance(info, dict):
            raise ValueError(f"{path}: entry {spk_id!r} is not a dict")
        emb = info.get("flow_embedding", info.get("embedding"))
        if emb is None:
            raise ValueError(f"{path}: entry {spk_id!r} has no flow_embedding/embedding")
        empty_tokens = np.zeros(0, np.int32)
        tokens = info.get("flow_prompt_speech_token", info.get("llm_prompt_speech_token"))
        feat = info.get("prompt_speech_feat")
        voices[str(spk_id)] = Voice(
            prompt_text_ids=_flat(info["prompt_text"], np.int32).reshape(-1) if "prompt_text" in info else empty_tokens,
            speech_tokens=_flat(tokens, np.int32).reshape(-1) if tokens is not None else empty_tokens,
            embedding=_flat(emb, np.float32).reshape(-1),
            prompt_feat=_flat(feat, np.float32).reshape(-1, 80) if feat is not None else np.zeros((0, 80), np.float32))
    return voices


def save_spk2info(path: str, voices: dict[str, Voice]) -> None:
    """Write voices in the official spk2info.pt shape (tensors with a batch dimension of 1)."""
    out = {}
    for spk_id, v in voices.items():
        text = torch.from_numpy(v.prompt_text_ids.astype(np.int32))[None]
        tok = torch.from_numpy(v.speech_tokens.astype(np.int32))[None]
        feat = torch.from_numpy(v.prompt_feat.astype(np.float32))[None]
        emb = torch.from_numpy(v.embedding.astype(np.float32))[None]
        out[spk_id] = {
            "prompt_text": text, "prompt_text_len": torch.tensor([text.shape[1]], dtype=torch.int32),
            "llm_prompt_speech_token": tok, "llm_prompt_speech_token_len": torch.tensor([tok.shape[1]], dtype=torch.int32),
            "flow_prompt_speech_token": tok, "flow_prompt_speech_token_len": torch.tensor([tok.shape[1]], dtype=torch.int32),
            "prompt_speech_feat": feat, "prompt_speech_feat_len": torch.tensor([feat.shape[1]], dtype=torch.int32),
            "llm_embedding": emb, "flow_embedding": emb}
    torch.save(out, path)
