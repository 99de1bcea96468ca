"""The prompt cache: per voice, the flow estimator's keys/values and causal-conv context over the
prompt frames that no generated token can change, so a streaming chunk computes only the frames
after them (the first chunk of a 5 s prompt: 100 of 300 frames); and, per streaming request, the
same for the frames its earlier chunks computed (the stream cache), so each chunk computes only
its own frames instead of the sentence so far.

Why those frames are fixed. In streaming mode the flow is causal in 50-frame chunks: the token
encoder's attention sees whole 25-token chunks and earlier ones, its up-sampling and the
estimator's convolutions look only left, and the estimator's attention sees whole 50-frame
chunks and earlier ones (static_chunk_size). The pre-look-ahead conv lets token t see t + 3. So
frame f depends on the tokens before 25 * (f // 50 + 1) + 3 and nothing else but the voice (prompt
features, speaker embedding) and the start noise, which is the official fixed noise at that frame.
With N tokens known (prompt + generated), the first 50 * floor((N - 3) / 25) frames
(`stable_frames`) are final at every Euler step, in both CFG branches (their x evolves from the
same noise through the same estimator outputs). For a prompt of P tokens that part is the same in
every chunk of every request with that voice; for a stream it grows with each chunk: with the
official schedule (hops that end on 25-token boundaries) every frame a chunk computes is final.

CosyVoice3's DiT (fused_dit.py) obeys the same rule: no attention before it (its pre-lookahead
convs see 3 tokens ahead), chunk-causal attention over 50-frame chunks, causal position convs,
and rotary positions that are absolute frame indices (a row continuing a prefix rotates by its
frames' own positions).

What is kept for them: each transformer's keys and values in one pool tensor, an entry's frames
in consecutive slots (CosyVoice2: 2 x 8 heads x 64 per frame, 56 layers, 10 Euler steps, 2 CFG
branches: 2.3 MB per frame in bf16, 0.46 GB for a 5 s prompt's 200 frames, 1.15 GB for a 10 s
sentence; CosyVoice3: 2 x 16 x 64, 22 layers: 1.8 MB per frame); and the last (kernel - 1) input
frames of every causal convolution, per step and branch (~0.7 MB per entry; CosyVoice3's two
position convs, 30 frames of 1024 channels each: 2.5 MB).

A row's cached frames are its voice's entry, then its stream's entry (which records the
voice frames it continues: `base`). A voice miss fills the entry with one solver pass over the
stable frames alone (the same math, batched over the missing voices, replayed from a CUDA graph on
a GPU; its output is not needed); the decode process runs it while idle, as soon as a streaming
request arrives, so the LLM's first tokens usually hide it. A stream's entry is written by the
chunk's own pass (a `Recorder` beside it) and grows by moving when the slots after it are taken.
Voice entries are dropped least recently used; a stream entry lives until its request's final
chunk (or abort); streams take only free slots (voices come first: many requests share one).
Short of room, a row runs without what does not fit (recomputing it: the same output, slower).
Full-attention rows (non-streaming requests, a stream's final chunk) see later frames, so they
never use the cache.
"""
from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

log = logging.getLogger("lighttts")

FILL_ROWS = 8   # voices per fill pass (the solver's graphs cover up to this many)


@dataclass
class Entry:
    start: int               # first pool slot
    frames: int              # cached frames (a multiple of the estimator's chunk)
    ctx: torch.Tensor        # (2 CFG branches, steps, ctx_size) conv context after the last cached frame
    capacity: int = 0        # slots held from `start` (>= frames; a stream grows into them)
    base: int = 0            # a stream's entry: the voice frames before its first frame

    def __post_init__(self):
        self.capacity = max(self.capacity, self.frames)


@dataclass
class RowPrefix:
    """A row's cached frames (its voice's, then its stream's) and what its pass keeps."""
    voice: Optional[Entry] = None
    stream: Optional[Entry] = None
    record_to: int = 0       # the pass keeps its frames before this absolute frame in `stream`

    @property
    def frames(self) -> int:
        return (self.voice.frames if self.voice else 0) + (self.stream.frames if self.stream else 0)

    @property
    def records(self) -> bool:
        return self.stream is not None and self.record_to > self.frames

    @property
    def ctx(self) -> Optional[torch.Tensor]:
        """The conv context after the last cached frame (None: no cached frame)."""
        if self.stream is not None and self.stream.frames:
            return self.stream.ctx
        return self.voice.ctx if self.voice else None


def token_chunk(flow, estimator) -> int:
    """Tokens per chunk of the flow's token encoder: CosyVoice2's conformer attends in chunks of
    static_chunk_size tokens; CosyVoice3 has no attention before the estimator (its pre-lookahead
    convs see 2 tokens back and pre_lookahead_len ahead), so its chunk is the estimator's frames
    in tokens."""
    encoder = getattr(flow, "encoder", None)
    if encoder is not None:
        return int(encoder.static_chunk_size)
    return estimator.chunk_frames // int(flow.token_mel_ratio)


def frame_bytes(estimator, n_steps: int, dtype: torch.dtype) -> int:
    """Pool bytes per cached frame for this estimator (FusedEstimator)."""
    return n_steps * 2 * estimator.n_layers * 2 * estimator.inner * torch.empty((), dtype=dtype).element_size()


@dataclass
class Target:
    """One batch row whose computed frames [0, count) go to `entry`'s slots from `offset` on."""
    row: int
    entry: Entry
    offset: int
    count: int


class Recorder:
    """Where a pass stores what the cache keeps: per target row its computed frames t < count go
    to pool slots entry.start + offset + t (every other frame to the trash slot), and every causal
    conv's input frames count - pad ... count - 1 to ctx[row] (conditional rows) and ctx[B + row]
    (unconditional). Tensor operations only, so a CUDA graph can capture the pass with the
    recorder's tensors as static inputs (cuda_graph.GraphSolver.run_recording)."""

    def __init__(self, cache: "PromptCache", slots: torch.Tensor, ends: torch.Tensor, ctx: torch.Tensor,
                 targets: Sequence[Target] = ()):
        self.cache, self.slots, self.ends, self.ctx = cache, slots, ends, ctx
        self.targets = list(targets)

    @classmethod
    def for_targets(cls, cache: "PromptCache", targets: Sequence[Target], rows: int, frames: int) -> "Recorder":
        """A recorder for a batch of `rows` x `frames`."""
        dev = cache.kv.device
        slots = torch.full((rows, frames), cache.trash, dtype=torch.int64)
        ends = torch.zeros(rows, dtype=torch.int64)
        for t in targets:
            first = t.entry.start + t.offset
            slots[t.row, :t.count] = torch.arange(first, first + t.count)
            ends[t.row] = t.count
        ctx = torch.zeros(2 * rows, cache.n_steps, cache.ctx_size, device=dev, dtype=cache.kv.dtype)
        return cls(cache, slots.to(dev), ends.to(dev), ctx, targets)

    def keys(self, step: int, layer: int, kv: torch.Tensor) -> None:
        """kv (2B, T, 2, H, D): this layer's keys and values of both CFG branches."""
        b2, t = kv.shape[:2]
        src = kv.reshape(2, b2 // 2, t, 2, -1).permute(1, 2, 0, 3, 4).reshape(-1, 2, 2, kv.shape[3] * kv.shape[4])
        self.cache.kv[:, step, :, layer].index_copy_(0, self.slots.reshape(-1), src)

    def context(self, step: int, offset: int, x: torch.Tensor, lead: int = 0) -> None:
        """x (2B, C, lead + T): a causal conv's input, its first `lead` frames the left context
        before the row's first computed frame; keep its `pad` frames before each row's end."""
        pad = self.cache.ctx_pad
        ends = torch.cat([self.ends, self.ends]) + lead
        idx = (ends.unsqueeze(1) - pad + torch.arange(pad, device=x.device)).clamp_(min=0)
        frames = torch.gather(x, 2, idx.unsqueeze(1).expand(-1, x.size(1), -1))          # (2B, C, pad)
        self.ctx[:, step, offset:offset + x.size(1) * pad] = frames.reshape(x.size(0), -1)

    def finish(self) -> None:
        """After the pass: each target's entry gets its conv context and counts the frames kept."""
        by_branch = self.ctx.view(2, -1, *self.ctx.shape[1:])
        for t in self.targets:
            t.entry.ctx.copy_(by_branch[:, t.row])
            t.entry.frames = t.offset + t.count


class PromptCache:
    def __init__(self, estimator, n_steps: int, capacity_frames: int, token_mel_ratio: int, pre_lookahead_len: int,
                 encoder_chunk_tokens: int, device, dtype: torch.dtype, streams: bool = True):
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
        self.trash = self.capacity   # one more slot: where a pass writes the frames it does not keep
        self.kv = torch.zeros(self.capacity + 1, n_steps, 2, est.n_layers, 2, est.inner, device=device, dtype=dtype)
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()   # voices, least recently used first
        # streams by their request's Token2Wav: released at the final chunk or by the decode
        # process; weak, so a request dropped without release frees its slots too
        self.streams: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self.stream_cache = streams
        self.hits = self.misses = 0
        self.stream_frames_reused = self.stream_fallbacks = self.stream_moves = 0

    @classmethod
    def for_flow(cls, flow, estimator, n_steps: int, gb: float, streams: bool = True) -> "PromptCache":
        """A cache of `gb` GB (1e9 bytes) for this flow model and its FusedEstimator."""
        p = next(flow.parameters())
        frames = int(gb * 1e9) // frame_bytes(estimator, n_steps, p.dtype)
        cache = cls(estimator, n_steps, frames, int(flow.token_mel_ratio), int(flow.pre_lookahead_len),
                    token_chunk(flow, estimator), p.device, p.dtype, streams=streams)
        log.info("prompt cache: %d frames (%.2f GB, %.2f MB per frame; streams %s)", frames, gb,
                 frame_bytes(estimator, n_steps, p.dtype) / 1e6, "on" if streams else "off")
        return cache

    def stable_frames(self, tokens: int) -> int:
        """Frames final once `tokens` tokens (prompt + generated, look-ahead included) are known."""
        return max(0, (tokens - self.lookahead) // self.token_chunk) * self.chunk_frames

    def pools(self, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one Euler step and layer: [slots, 2 branches, H, D] views."""
        shape = (self.capacity + 1, 2, self.heads, self.head_dim)
        return self.kv[:, step, :, layer, 0].view(shape), self.kv[:, step, :, layer, 1].view(shape)

    def context(self, prefixes: Sequence[Optional[RowPrefix]], rows: int) -> torch.Tensor:
        """(2 CFG branches, rows, steps, ctx_size): each row's conv context after its cached frames,
        zeros for rows without any (flattened over the first two dims, the rows of the CFG-doubled
        batch)."""
        out = torch.zeros(2, rows, self.n_steps, self.ctx_size, device=self.kv.device, dtype=self.kv.dtype)
        for i, p in enumerate(prefixes):
            ctx = p.ctx if p is not None else None
            if ctx is not None:
                out[:, i] = ctx
        return out

    # ---- slots -------------------------------------------------------------------------------

    def _new_entry(self, start: int, frames: int, capacity: int, base: int = 0) -> Entry:
        ctx = torch.zeros(2, self.n_steps, self.ctx_size, device=self.kv.device, dtype=self.kv.dtype)
        return Entry(start, frames, ctx, capacity, base)

    def _used(self, skip: Optional[Entry] = None) -> list:
        """Sorted (first, end) slot ranges held by voices and streams (but `skip`)."""
        held = [e for e in self.entries.values()] + [e for e in self.streams.values()]
        return sorted((e.start, e.start + e.capacity) for e in held if e is not skip)

    def _free_slots(self, frames: int, skip: Optional[Entry] = None) -> Optional[int]:
        """The first slot of `frames` free consecutive slots (first fit; `skip`'s count as free)."""
        return self._first_fit(self._used(skip), frames)

    def _slots(self, frames: int, pinned: set) -> Optional[int]:
        """Free slots for `frames` frames, dropping least recently used voices not in `pinned` until
        they fit; None if they cannot."""
        while True:
            start = self._free_slots(frames)
            if start is not None:
                return start
            victim = next((k for k in self.entries if k not in pinned), None)
            if victim is None:
                return None
            del self.entries[victim]

    def _allocate(self, key: bytes, frames: int, pinned: set) -> Optional[Entry]:
        """A voice entry for `frames` frames, or None if they cannot fit."""
        # fragmentation aside, the pinned entries must leave room: else evicting the rest is no use
        if frames + sum(self.entries[k].frames for k in pinned if k in self.entries) > self.capacity:
            return None
        start = self._slots(frames, pinned)
        if start is None:
            return None
        entry = self.entries[key] = self._new_entry(start, frames, frames)
        return entry

    def _first_fit(self, used: list, frames: int) -> Optional[int]:
        """The first slot of a gap of `frames` between the sorted used ranges, or None."""
        start = 0
        for lo, hi in used:
            if lo - start >= frames:
                return start
            start = max(start, hi)
        return start if self.capacity - start >= frames else None

    def _stream_room(self, t2w, base: int, need: int) -> Optional[Entry]:
        """The stream entry of `t2w` (after `base` voice frames) with room for `need` frames: kept,
        grown in place, moved (its frames copied), or new; None (and none kept) if it cannot fit.
        A stream takes only free slots: it evicts neither voices nor other streams."""
        entry = self.streams.get(t2w)
        if entry is not None and entry.capacity >= need:
            return entry
        want = need + need // 2   # half again: a growing stream moves O(log n) times
        if entry is not None:
            end = entry.start + entry.capacity
            nxt = min([lo for lo, _ in self._used(entry) if lo >= end] + [self.capacity])
            if entry.start + need <= nxt:   # grow in place
                entry.capacity = min(want, nxt - entry.start)
                return entry
        # free slots only, never by evicting a voice: its refill costs a pass, and a voice that then
        # finds no room would drop every stream of it (their frames continue the voice's)
        size, start = want, self._free_slots(want, entry)
        if start is None:
            size, start = need, self._free_slots(need, entry)
        if start is None:
            self.release(t2w)
            return None
        moved = self._new_entry(start, 0, size, base)
        if entry is not None and entry.frames:
            # the ranges may overlap (first fit may reuse the old slots): clone first
            self.kv[start:start + entry.frames] = self.kv[entry.start:entry.start + entry.frames].clone()
            moved.frames = entry.frames
            moved.ctx.copy_(entry.ctx)
            self.stream_moves += 1
        self.streams[t2w] = moved
        return moved

    def release(self, t2w) -> None:
        """Free the stream entry of this request (its final chunk, its end, or an abort)."""
        self.streams.pop(t2w, None)

    # ---- rows --------------------------------------------------------------------------------

    def prefixes(self, flow, rows: Sequence, count: bool = True) -> list[Optional[RowPrefix]]:
        """Per (Token2Wav, Chunk) row its cached frames, or None (a full-attention row, nothing
        cached and nothing to keep); a Chunk of None asks for the voice only (an early fill). The
        voices missing are filled first, in one pass (batched_flow.BatchedFlow `flow`). A final
        chunk releases its stream. count=False: hits are not counted (an early fill)."""
        out: list = [None] * len(rows)
        pinned: set = set()
        fill: dict = {}   # key -> (entry, Token2Wav)
        for j, (t2w, chunk) in enumerate(rows):
            if chunk is not None and not chunk.streaming:
                self.release(t2w)
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
            out[j] = RowPrefix(voice=entry)
        if fill:
            try:
                self._fill(flow, list(fill.values()))
                self.misses += len(fill)
            except Exception as e:   # those rows run without the cache; the batch goes on
                log.warning("prompt cache: filling %d voice(s) failed (%s); their rows run uncached", len(fill), e)
                failed = {id(self.entries.pop(key)) for key in fill}
                out = [None if x is not None and id(x.voice) in failed else x for x in out]
        if self.stream_cache:
            for j, (t2w, chunk) in enumerate(rows):
                if chunk is not None and chunk.streaming:
                    out[j] = self._stream_prefix(t2w, chunk, out[j])
        return out

    def _stream_prefix(self, t2w, chunk, prefix: Optional[RowPrefix]) -> Optional[RowPrefix]:
        """A streaming chunk's prefix with its stream: the frames earlier chunks kept, and room to
        keep the frames of this one that are final."""
        prefix = prefix or RowPrefix()
        base = prefix.frames
        record_to = self.stable_frames(t2w.prompt_tokens.size(1) + chunk.tokens.numel())
        stream = self.streams.get(t2w)
        # the chunk's audio starts at this frame: a stream's frames must end there or before (they
        # do on the schedule; a chunk run again does not), and continue the same voice frames
        first_new = t2w.prompt_feat.size(1) + chunk.offset * (self.chunk_frames // self.token_chunk)
        if stream is not None and (stream.base != base or base + stream.frames > first_new):
            self.release(t2w)
            stream = None
        if record_to > base + (stream.frames if stream else 0):
            stream = self._stream_room(t2w, base, record_to - base)
            if stream is None:
                self.stream_fallbacks += 1
                log.debug("prompt cache: no room for a stream's %d frames; it recomputes them", record_to - base)
        if stream is not None:
            self.stream_frames_reused += stream.frames
            prefix.stream, prefix.record_to = stream, record_to
        return prefix if (prefix.voice is not None or prefix.stream is not None) else None

    def recorder(self, prefixes: Sequence[Optional[RowPrefix]], rows: int, frames: int) -> Optional[Recorder]:
        """The recorder of a batch (rows x frames, padded) whose rows have these prefixes: each
        recording row keeps its frames up to record_to in its stream; None if no row records."""
        targets = [Target(i, p.stream, p.stream.frames, p.record_to - p.frames)
                   for i, p in enumerate(prefixes) if p is not None and p.records]
        return Recorder.for_targets(self, targets, rows, frames) if targets else None

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
            targets = [Target(j, e, 0, e.frames) for j, e in enumerate(entries)]
            record = Recorder.for_targets(self, targets, batch.mu.size(0), batch.mu.size(2))
            flow.solver.run_recording(batch, record)
            record.finish()

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
                flow.solver.run_recording(batch, Recorder.for_targets(self, [], batch.mu.size(0), batch.mu.size(2)))
