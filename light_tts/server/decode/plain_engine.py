"""PlainEngine: the decode engine of CosyVoice3 until a batched DiT engine exists.

Each (Token2Wav, Chunk) row runs through the plain reference pipeline (Token2Wav.run: the DiT
flow, then the causal vocoder, which re-vocodes the sentence's mel so far as the official), one
row at a time: the same audio as light_tts.models.token2wav.stream_chunks, the engine adds only
the per-row error bookkeeping of DecodeEngine's interface. No prompt cache, no CUDA graphs.
"""
from __future__ import annotations

from typing import Sequence

import torch


class PlainEngine:
    prompt_cache = None    # the prompt cache is the batched CosyVoice2 flow's (decode/prompt_cache.py)
    late_captures = 0      # no CUDA graphs here

    def __init__(self, flow, hift):
        self.flow, self.hift = flow, hift

    @torch.inference_mode()
    def run(self, rows: Sequence) -> list:
        """rows: (Token2Wav, Chunk) pairs. Returns per row float32 audio [samples] (numpy) or the
        exception that failed that row (a bad row fails alone)."""
        out: list = []
        for t2w, chunk in rows:
            try:
                out.append(t2w.run(chunk)[0].numpy())
            except Exception as e:
                out.append(e)
        return out

    def warm_prompts(self, t2ws: Sequence) -> int:
        return 0

    def release(self, t2ws: Sequence) -> None:
        pass
