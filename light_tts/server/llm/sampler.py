"""Sampling of one step's tokens for the whole batch (Qwen2LM.sample_token's rules, batched).

Rules per row (light_tts.models.llm / sampling): scores = log_softmax(logits) in fp32; id S masked
while the piece is shorter than its min length (`ignore_eos`: the one id the official masks, which
is CosyVoice2's eos and CosyVoice3's sos, so a CosyVoice3 piece may still end on its other stop
ids), every non-speech token masked in fixed-length mode (`block_stops`); greedy = argmax;
otherwise RAS: nucleus (top-p, top-k) draw, and if that token occurs >= win_size * tau_r times in
the piece's last win_size tokens, a draw from the full distribution without it.

Two ways to draw, same distribution:

- "exact" (default on CPU): the masking, softmax, sort and top-p cut run once for the batch; the
  draws are `torch.multinomial` calls on each request's own torch.Generator, on exactly the
  tensors light_tts.models.sampling builds. Tokens therefore equal Qwen2LM.inference with the
  same seed, token for token. Cost: a small Python loop over the batch with one multinomial (and
  one host sync) per row; fine on a CPU, too slow for large GPU batches.
- "batched" (default on CUDA): everything for the whole batch in one pass on the device
  (`draw`: no host sync, no data-dependent shapes, so the engine captures it in the decode step's
  CUDA graph), with one host sync when the tokens are read. Uniform numbers come from a
  counter-based hash of (request seed, piece, step, draw), so a request's random numbers depend on
  its seed alone, not on the batch it ran in (its logits can still differ by bf16 rounding between
  batch shapes); they are not the numbers torch.Generator would give, so tokens differ from the
  plain path.

Greedy (either mode) is `draw` too: argmax of the masked scores.

A batch's per-row inputs for `draw` are one int64 tensor [3 + W, B] (`inputs`): seed, counter,
flags (1 = eos masked, 2 = every stop token masked) and the RAS window (W last tokens, -1 where
the piece is shorter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

M32 = 0xFFFFFFFF
SEED_MASK = (1 << 63) - 1   # seeds travel as int64


@dataclass
class SampleRow:
    decoded: Sequence[int]                         # this piece's tokens so far (RAS window)
    ignore_eos: bool
    block_stops: bool
    generator: Optional[torch.Generator] = None    # exact mode
    seed: int = 0                                  # batched mode
    counter: int = 0                               # batched mode: (piece, step) packed


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser in int64 arithmetic (no overflow: operands stay < 2^32 * 2^27)."""
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & M32
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & M32
    return h ^ (h >> 16)


def counter_uniform(seed: torch.Tensor, counter: torch.Tensor, draw: int) -> torch.Tensor:
    """Uniform [0, 1) float32 per row from int64 (seed, counter) and a draw index."""
    lo, hi = seed & M32, (seed >> 32) & M32
    h = _mix32((lo ^ ((counter & 0xFFFFFFF) * 0x9E3779B1 & M32)) & M32)
    h = _mix32(h ^ hi ^ (draw * 0x632BE5AB & M32))
    h = _mix32(h ^ ((counter >> 28) & M32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


class Sampler:
    def __init__(self, speech_token_size: int, top_p: float, top_k: int, win_size: int, tau_r: float,
                 mode: str = "exact", greedy: bool = False):
        if mode not in ("exact", "batched"):
            raise ValueError(f"sampler mode must be 'exact' or 'batched', got {mode!r}")
        self.S = int(speech_token_size)
        self.top_p, self.top_k, self.win_size, self.tau_r = float(top_p), int(top_k), int(win_size), float(tau_r)
        self.mode = mode
        self.greedy = greedy

    @property
    def window(self) -> int:
        return max(self.win_size, 1)

    @property
    def per_request_rng(self) -> bool:
        """The exact RAS path: host-side draws with each request's torch.Generator. Otherwise
        (batched or greedy) `draw` runs on tensors alone, so a CUDA graph can hold it."""
        return self.mode == "exact" and not self.greedy

    def inputs(self, rows: Sequence[SampleRow], out: Optional[np.ndarray] = None) -> np.ndarray:
        """The rows' per-row inputs of `draw`, int64 [3 + W, B] (written into `out` when given)."""
        w = self.window
        if out is None:
            out = np.empty((3 + w, len(rows)), dtype=np.int64)
        out[0] = [r.seed & SEED_MASK for r in rows]
        out[1] = [r.counter for r in rows]
        out[2] = _flags(rows)
        out[3:] = -1
        if self.win_size > 0 and not self.greedy:   # greedy draws read only the flags
            for b, r in enumerate(rows):
                tail = r.decoded[-w:]
                if len(tail):
                    out[3 + w - len(tail):, b] = tail
        return out

    def masked_scores(self, logits: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """fp32 log-probabilities with eos (flag 1) or every stop token (flag 2) at -inf, per row."""
        scores = logits.float().log_softmax(dim=-1)
        col = torch.arange(scores.shape[1], device=scores.device)
        masked = ((flags & 1).bool()[:, None] & (col == self.S)) | ((flags & 2).bool()[:, None] & (col >= self.S))
        return scores.masked_fill(masked, -float("inf"))

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
        """logits [B, V] (V = S + 3 for CosyVoice2, S + 200 for CosyVoice3) -> one token per row."""
        if self.per_request_rng:
            flags = torch.tensor(_flags(rows), dtype=torch.int64, device=logits.device)
            return self._exact(self.masked_scores(logits, flags), rows)
        inputs = torch.from_numpy(self.inputs(rows)).to(logits.device, non_blocking=True)
        return self.draw(logits, inputs).tolist()

    def _exact(self, scores: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
        probs = scores.softmax(dim=-1)
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True, stable=True)
        head = sorted_probs[:, :self.top_k]
        mass_before = torch.cat((head.new_zeros(head.shape[0], 1), torch.cumsum(head, dim=-1)[:, :-1]), dim=-1)
        num_kept = (mass_before < self.top_p).sum(dim=-1).tolist()
        out = []
        for b, row in enumerate(rows):
            choice = torch.multinomial(head[b, :num_kept[b]], 1, replacement=True, generator=row.generator)
            token = int(sorted_idx[b, choice].item())
            window = list(row.decoded)[-self.win_size:] if self.win_size > 0 else []
            if sum(1 for t in window if int(t) == token) >= self.win_size * self.tau_r:
                s = scores[b].clone()
                s[token] = -float("inf")
                p = s.softmax(dim=0)
                token = int(torch.multinomial(p, 1, replacement=True, generator=row.generator).item())
            out.append(token)
        return out

    def draw(self, logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """logits [B, V], inputs int64 [3 + W, B] on the same device -> tokens int64 [B], on the
        device. Graph-capturable: fixed shapes, no host sync."""
        seed, counter, flags, hist = inputs[0], inputs[1], inputs[2], inputs[3:].t()
        scores = self.masked_scores(logits, flags)
        if self.greedy:
            return scores.argmax(dim=-1)

        probs = scores.softmax(dim=-1)
        k = min(self.top_k, probs.shape[1])
        head, idx = probs.topk(k, dim=-1)                              # sorted, largest first
        mass_before = torch.cumsum(head, dim=-1) - head
        keep = mass_before < self.top_p
        keep[:, 0] = True                                              # the top token is always kept
        cdf = torch.cumsum(torch.where(keep, head, torch.zeros_like(head)), dim=-1)
        u = counter_uniform(seed, counter, 0) * cdf[:, -1]
        choice = (cdf <= u[:, None]).sum(dim=-1).clamp_(max=k - 1)
        tok1 = idx.gather(1, choice[:, None])                          # [B, 1]
        if self.win_size <= 0:
            return tok1[:, 0]

        redraw = (hist == tok1).sum(dim=-1) >= self.win_size * self.tau_r
        p2 = probs.scatter(1, tok1, 0.0)
        cdf2 = torch.cumsum(p2, dim=-1)
        u2 = counter_uniform(seed, counter, 1) * cdf2[:, -1]
        tok2 = (cdf2 <= u2[:, None]).sum(dim=-1).clamp_(max=p2.shape[1] - 1)
        return torch.where(redraw, tok2, tok1[:, 0])


def _flags(rows: Sequence[SampleRow]) -> list[int]:
    """Per row: 1 = eos masked (shorter than its min length), 2 = every stop token masked (fixed length)."""
    return [int(r.ignore_eos) | (int(r.block_stops) << 1) for r in rows]
