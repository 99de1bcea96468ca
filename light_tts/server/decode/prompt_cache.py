"""The prompt cache: per voice, the flow estimator's keys/values and causal-conv context over the
prompt frames that no generated token can change, so a streaming chunk computes only the frames
after them (the first chunk of a 5 s prompt: 100 of 300 frames).

Why those frames are fixed. In streaming mode the flow is causal in 50-frame chunks: the token
encoder's attention sees whole 25-token chunks and earlier ones, its up-sampling and the
estimator's convolutions look only left, and the estimator's attention sees whole 50-frame
chunks and earlier ones (static_chunk_size). The pre-look-ahead conv lets token t see t + 3. So
frame f depends on the tokens before 25 * (f // 50 + 1) + 3 and nothing else but the voice (prompt
features, speaker embedding) and the start noise, which is the official fixed noise at that frame.
With a prompt of P tokens, the first 50 * floor((P - 3) / 25) frames (`stable_frames`) are the same
in every streaming chunk of every request with that voice, at every Euler step, in both CFG
branches (their x evolves from the same noise through the same estimator outputs).

What is kept for them: each transformer's keys and values (2 x 8 heads x 64 per frame, 56 layers,
10 Euler steps, 2 CFG branches: 2.3 MB per frame in bf16, 0.46 GB for a 5 s prompt's 200 frames)
in one pool tensor, a voice's frames in consecutive slots; and the last (kernel - 1) input frames
of every causal convolution, per step and branch (~0.7 MB per voice). A miss fills the entry with
one solver pass over the stable frames alone (the same math, batched over the missing voices,
replayed from a CUDA graph on a GPU; its output is not needed). The decode process runs it while
idle, as soon as a streaming request arrives, so the LLM's first tokens usually hide it. Entries
are dropped least recently used; one that cannot get slots leaves its rows uncached.
Full-attention rows (non-streaming requests, a stream's final chunk) see later frames, so they
never use the cache.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

log = logging.getLogger("lighttts")

FILL_ROWS = 8   # voices per fill pass (the solver's graphs cover up to this many)


@dataclass
class Entry:
    start: int               # first pool slot
    frames: int              # cached frames (a multiple of the estimator's chunk)
    ctx: torch.Tensor        # (2 CFG branches, steps, ctx_size) conv context after the last cached frame


def frame_bytes(estimator, n_steps: int, dtype: torch.dtype) -> int:
    """Pool bytes per cached frame for this estimator (FusedEstimator)."""
    return n_steps * 2 * estimator.n_layers * 2 * estimator.inner * torch.empty((), dtype=dtype).element_size()


class Recorder:
    """Where a fill pass stores what the cache keeps: row i's computed frames t < ends[i] go to
    pool slots slots[i, t] (padding frames to the trash slot), and every causal conv's input
    frames ends[i] - pad ... ends[i] - 1 to ctx[i] (conditional rows) and ctx[B + i]
    (unconditional). Tensor operations only, so a CUDA graph can capture the pass with the
    recorder's tensors as static inputs (cuda_graph.GraphSolver.run_recording)."""

    def __init__(self, cache: "PromptCache", slots: torch.Tensor, ends: torch.Tensor, ctx: torch.Tensor):
        self.cache, self.slots, self.ends, self.ctx = cache, slots, ends, ctx

    @classmethod
    def for_entries(cls, cache: "PromptCache", entries: Sequence[Entry], rows: int, frames: int) -> "Recorder":
        """A recorder for a batch of `rows` x `frames` whose first rows fill `entries`."""
        dev = cache.kv.device
        slots = torch.full((rows, frames), cache.trash, dtype=torch.int64)
        ends = torch.zeros(rows, dtype=torch.int64)
        for i, e in enumerate(entries):
            slots[i, :e.frames] = torch.arange(e.start, e.start + e.frames)
            ends[i] = e.frames
        ctx = torch.zeros(2 * rows, cache.n_steps, cache.ctx_size, device=dev, dtype=cache.kv.dtype)
        return cls(cache, slots.to(dev), ends.to(dev), ctx)

    def keys(self, step: int, layer: int, kv: torch.Tensor) -> None:
        """kv (2B, T, 2, H, D): this layer's keys and values of both CFG branches."""
        b2, t = kv.shape[:2]
        src = kv.reshape(2, b2 // 2, t, 2, -1).permute(1, 2, 0, 3, 4).reshape(-1, 2, 2, kv.shape[3] * kv.shape[4])
        self.cache.kv[:, step, :, layer].index_copy_(0, self.slots.reshape(-1), src)

    def context(self, step: int, offset: int, x: torch.Tensor) -> None:
        """x (2B, C, T): a causal conv's input; keep its `pad` frames before each row's end."""
        pad = self.cache.ctx_pad
        ends = torch.cat([self.ends, self.ends])
        idx = (ends.unsqueeze(1) - pad + torch.arange(pad, device=x.device)).clamp_(min=0)
        frames = torch.gather(x, 2, idx.unsqueeze(1).expand(-1, x.size(1), -1))          # (2B, C, pad)
        self.ctx[:, step, offset:offset + x.size(1) * pad] = frames.reshape(x.size(0), -1)

    def finish(self, entries: Sequence[Entry]) -> None:
        """Hand each entry its conv context (after the pass)."""
        by_branch = self.ctx.view(2, -1, *self.ctx.shape[1:])
        for i, e in enumerate(entries):
            e.ctx.copy_(by_branch[:, i])


class PromptCache:
    def __init__(self, estimator, n_steps: int, capacity_frames: int, token_mel_ratio: int, pre_lookahead_len: int,
                 encoder_chunk_tokens: int, device, dtype: torch.dtype):
        est = estimator
        self.chunk_frames = est.chunk_frames
        if self.chunk_frames <= 0 or encoder_chunk_tokens * token_mel_ratio != self.chunk_frames:
            raise ValueError(f"the prompt cache needs chunk-causal streaming with the encoder's chunk "
                             f"({encoder_chunk_tokens} tokens x {token_mel_ratio}) equal to the estimator's "
                             f"({self.chunk_frames} frames)")
        self.token_chunk = encoder_chunk_tokens
        self.lookahead = pre_lookahead_len
        self.n_steps = n_steps
        self.heads, self.head_dim = est.heads, est.head_dim
        self.ctx_size = est.ctx_size
        self.ctx_pad = est.ctx_pad
        self.capacity = int(capacity_frames)
        self.trash = self.capacity   # one more slot: where a fill pass writes its padding frames
        self.kv = torch.zeros(self.capacity + 1, n_steps, 2, est.n_layers, 2, est.inner, device=device, dtype=dtype)
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()   # least recently used first
        self.hits = self.misses = 0

    @classmethod
    def for_flow(cls, flow, estimator, n_steps: int, gb: float) -> "PromptCache":
        """A cache of `gb` GB (1e9 bytes) for this flow model and its FusedEstimator."""
        p = next(flow.parameters())
        frames = int(gb * 1e9) // frame_bytes(estimator, n_steps, p.dtype)
        cache = cls(estimator, n_steps, frames, int(flow.token_mel_ratio), int(flow.pre_lookahead_len),
                    int(flow.encoder.static_chunk_size), p.device, p.dtype)
        log.info("prompt cache: %d frames (%.2f GB, %.2f MB per frame)", frames, gb,
                 frame_bytes(estimator, n_steps, p.dtype) / 1e6)
        return cache

    def stable_frames(self, prompt_tokens: int) -> int:
        return max(0, (prompt_tokens - self.lookahead) // self.token_chunk) * self.chunk_frames

    def pools(self, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one Euler step and layer: [slots, 2 branches, H, D] views."""
        shape = (self.capacity + 1, 2, self.heads, self.head_dim)
        return self.kv[:, step, :, layer, 0].view(shape), self.kv[:, step, :, layer, 1].view(shape)

    def context(self, prefixes: Sequence[Optional[Entry]], rows: int) -> torch.Tensor:
        """(2 CFG branches, rows, steps, ctx_size): each row's entry's context, zeros for rows without
        one (flattened over the first two dims, the rows of the CFG-doubled batch)."""
        out = torch.zeros(2, rows, self.n_steps, self.ctx_size, device=self.kv.device, dtype=self.kv.dtype)
        for i, e in enumerate(prefixes):
            if e is not None:
                out[:, i] = e.ctx
        return out

    def _allocate(self, key: bytes, frames: int, pinned: set) -> Optional[Entry]:
        """Slots for `frames` consecutive frames (first fit), dropping least recently used entries
        not in `pinned` until they fit; None if they cannot."""
        # fragmentation aside, the pinned entries must leave room: else evicting the rest is no use
        if frames + sum(self.entries[k].frames for k in pinned if k in self.entries) > self.capacity:
            return None
        while True:
            start = self._first_fit(sorted((e.start, e.start + e.frames) for e in self.entries.values()), frames)
            if start is not None:
                entry = Entry(start, frames, torch.zeros(2, self.n_steps, self.ctx_size, device=self.kv.device,
                                                         dtype=self.kv.dtype))
                self.entries[key] = entry
                return entry
            victim = next((k for k in self.entries if k not in pinned), None)
            if victim is None:
                return None
            del self.entries[victim]

    def _first_fit(self, used: list, frames: int) -> Optional[int]:
        """The first slot of a gap of `frames` between the sorted used ranges, or None."""
        start = 0
        for lo, hi in used:
            if lo - start >= frames:
                return start
            start = max(start, hi)
        return start if self.capacity - start >= frames else None

    def prefixes(self, flow, rows: Sequence, count: bool = True) -> list[Optional[Entry]]:
        """Per (Token2Wav, streaming) row its entry, or None (not streaming, prompt under one
        chunk, no room, its fill failed); the entries missing are filled first, in one pass
        (batched_flow.BatchedFlow `flow`). count=False: hits are not counted (an early fill)."""
        out: list = [None] * len(rows)
        pinned: set = set()
        fill: dict = {}   # key -> (entry, Token2Wav)
        for j, (t2w, streaming) in enumerate(rows):
            if not streaming:
                continue
            frames = self.stable_frames(t2w.prompt_tokens.size(1))
            if frames == 0:
                continue
            key = t2w.conditioning_key
            entry = self.entries.get(key)
            if entry is None:
                entry = self._allocate(key, frames, pinned)
                if entry is None:
                    continue
                fill[key] = (entry, t2w)
            else:   # cached, or filled for an earlier row of this batch
                self.hits += count
                self.entries.move_to_end(key)
            pinned.add(key)
            out[j] = entry
        if fill:
            try:
                self._fill(flow, list(fill.values()))
                self.misses += len(fill)
            except Exception as e:   # those rows run without the cache; the batch goes on
                log.warning("prompt cache: filling %d voice(s) failed (%s); their rows run uncached", len(fill), e)
                failed = {id(self.entries.pop(key)) for key in fill}
                out = [None if x is not None and id(x) in failed else x for x in out]
        return out

    @torch.inference_mode()
    def _fill(self, flow, items: Sequence) -> None:
        """Solver passes over the stable frames of each (entry, Token2Wav), recording; up to
        FILL_ROWS voices per pass (graphs for small batches: cuda_graph.GraphSolver)."""
        k = self.lookahead
        for i in range(0, len(items), FILL_ROWS):
            group = items[i:i + FILL_ROWS]
            seqs = [t2w.prompt_tokens[0] for _, t2w in group]
            # the last k prompt tokens are look-ahead: the frames kept never depend on what follows
            mu = flow.encode(seqs, [s.numel() - k for s in seqs], [True] * len(seqs))
            entries = [e for e, _ in group]
            emb = torch.cat([t2w.embedding for _, t2w in group], dim=0)
            batch = flow.make_batch([mu[j, :, :e.frames] for j, e in enumerate(entries)],
                                    [t2w.prompt_feat[0, :e.frames] for e, t2w in group], emb, [True] * len(group),
                                    [None] * len(group))
            batch.ctx, batch.cache = None, None
            record = Recorder.for_entries(self, entries, batch.mu.size(0), batch.mu.size(2))
            flow.solver.run_recording(batch, record)
            record.finish(entries)

    @torch.inference_mode()
    def warm_up(self, flow, frames: Sequence[int], voices: Sequence[int]) -> None:
        """Run (capture) the fill passes of these frame counts and voice counts, writing only the
        trash slot."""
        dev, dtype = self.kv.device, self.kv.dtype
        for rows in voices:
            for n in frames:
                mu = torch.zeros(flow.flow.output_size, n, device=dev, dtype=dtype)
                emb = torch.zeros(rows, flow.flow.spk_embed_affine_layer.in_features, device=dev, dtype=dtype)
                batch = flow.make_batch([mu] * rows, [mu.new_zeros(0, mu.size(0))] * rows, emb, [True] * rows,
                                        [None] * rows)
                batch.ctx, batch.cache = None, None
                flow.solver.run_recording(batch, Recorder.for_entries(self, [], batch.mu.size(0), batch.mu.size(2)))
