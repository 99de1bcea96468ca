"""The 10-step Euler loop (20 estimator passes with CFG) captured as one CUDA graph per shape, and
for small batches the token encoder before it (GraphEncoder) and the HiFT network after it
(GraphHift), for the same reason.

The estimator launches on the order of a thousand small kernels per pass, so at small batches
launch overhead, not math, sets the latency. Shapes are bucketed: rows up to a power of two
(<= max_batch_size), frames up to a multiple of FRAME_BUCKET; the extra rows and frames are
padding the masks already make invisible (batched_flow.py). Graphs are captured on first use
(warm_up captures the common ones at start) and share one memory pool (graphs replay one at a
time and their outputs are copied out at once, so their intermediates can share memory; each
graph's output stays allocated). The solver's graphs read their inputs from one set of flat
buffers sized for the largest bucket; the encoder's and HiFT's have buffers per graph. Shapes past
the largest bucket run eagerly.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable, Optional

import torch

from light_tts.server.decode.batched_flow import EagerSolver, FlowBatch, RowEncoder
from light_tts.server.decode.batched_hift import BatchedHift

log = logging.getLogger("lighttts")

FRAME_BUCKET = 100
MAX_FRAMES = 1500
# per runner: the solver's warm-up captures 8 frame buckets x its batch buckets, 12 x with the stream
# cache's record passes, + 7 long-frame graphs x 2 small batches + 16 fills: 114 at batch 64 with the
# caches; the rest is room for shapes met while serving before the least recently used goes
MAX_GRAPHS = 192
ENCODER_GRAPH_MAX_ROWS = 8   # GraphEncoder: larger batches run the encoder eagerly
HIFT_GRAPH_MAX_ROWS = 8      # GraphHift: the same reasoning (launch bound only at small batches)
HIFT_FRAME_BUCKET = 16       # GraphHift: mel frames rounded up to a multiple of this ...
HIFT_MAX_FRAMES = 320        # ... up to this (streaming chunks are 50-120 frames); longer: eager


def capture_graph(fn: Callable, pool=None):
    """(graph, output) of fn() captured after two warm-up runs on a side stream (allocator,
    cuBLAS/cuDNN plans, Triton and torch.compile builds happen there, not in the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph, output


class GraphCache:
    """What the three graph runners share: captured graphs by bucket key in one memory pool, the
    least recently used dropped past MAX_GRAPHS, captured on first use by the runner's
    `capture(key, like)`. A failed capture switches the runner to eager for good (slower, not
    wrong), except running out of memory, which must surface (at start, the decode process then
    names the flag to change)."""

    def init_graphs(self, pool) -> None:
        self.graphs: OrderedDict = OrderedDict()   # key -> (graph, static inputs, output)
        self.pool = pool   # one pool for all decode graphs (graph_pool_handle): they replay one at a time
        self.failed = False
        self.warm = False   # set after the start's warm-up: a capture after it stalls requests (logged)
        self.late_captures = 0

    def capture_fn(self, fn: Callable):
        """(graph, output) of fn() captured in this runner's pool (tests replace it with eager replay)."""
        return capture_graph(fn, self.pool)

    def keep(self, key, graph, inputs, output):
        self.pool = graph.pool()
        self.graphs[key] = (graph, inputs, output)
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return self.graphs[key]

    def graph_for(self, key, like, what: str, flag: str = "failed"):
        """The entry of `key` (captured now if new), or None once a capture has failed (which sets
        the attribute `flag`: the runner checks it before asking again)."""
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            return entry
        try:
            t0 = time.perf_counter()
            entry = self.capture(key, like)
            if self.warm:   # a shape the warm-up did not cover, or one evicted since: say so
                self.late_captures += 1
                log.info("%s: CUDA graph for %s captured while serving (%.2f s; %d graphs kept)", what, key,
                         time.perf_counter() - t0, len(self.graphs))
            return entry
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            log.warning("%s CUDA graph capture failed (%s); it runs eagerly from now on", what, e)
            setattr(self, flag, True)
            return None


def batch_buckets(max_batch_size: int) -> list[int]:
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


class GraphSolver(GraphCache, EagerSolver):
    def __init__(self, cfm, step: Callable, max_batch_size: int, n_timesteps: int = 10,
                 frame_bucket: int = FRAME_BUCKET, max_frames: int = MAX_FRAMES, pool=None):
        super().__init__(cfm, step, n_timesteps)
        self.buckets = batch_buckets(max_batch_size)
        self.frame_bucket = frame_bucket
        self.max_frames = -(-max_frames // frame_bucket) * frame_bucket
        self.init_graphs(pool)
        self.record_failed = False
        self.buffers: dict = {}

    def bucket(self, rows: int, frames: int) -> tuple[int, int]:
        if frames > self.max_frames or rows > self.buckets[-1]:
            return rows, frames  # eager
        b = next(b for b in self.buckets if b >= rows)
        return b, -(-frames // self.frame_bucket) * self.frame_bucket

    @staticmethod
    def _shape(name: str, like: FlowBatch, rows: int, frames: int) -> tuple:
        c = like.mu.size(1)
        return {"mu": (rows, c, frames), "mask": (rows, 1, frames), "spks": (rows, c), "cond": (rows, c, frames),
                "lengths": (rows,), "streaming": (rows,), "prefix_start": (rows,), "prefix_len": (rows,),
                "stream_start": (rows,), "stream_len": (rows,),
                "ctx": (2, rows, *tuple(like.ctx.shape[2:])) if like.ctx is not None else None,
                "bias": (rows, 1, frames, frames)}[name]

    def _inputs(self, rows: int, frames: int, like: FlowBatch) -> FlowBatch:
        """Views of the shared flat buffers with this bucket's shapes (contiguous), for the tensors
        `like` has (the dense bias only for estimators that take one, ctx only with a prompt cache)."""
        views = {}
        for name in FlowBatch.TENSORS:
            t = getattr(like, name)
            if t is None:
                continue
            buf = self.buffers.get(name)
            if buf is None:
                big = self._shape(name, like, self.buckets[-1], self.max_frames)
                buf = self.buffers[name] = torch.zeros(big, device=t.device, dtype=t.dtype).view(-1)
            shape = self._shape(name, like, rows, frames)
            n = 1
            for d in shape:
                n *= d
            views[name] = buf[:n].view(shape)
        return FlowBatch(**views, cache=like.cache)

    def _zeroed_inputs(self, rows: int, frames: int, like: FlowBatch) -> FlowBatch:
        """The bucket's static inputs, zeroed: the capture's warm-up runs must not read a stale
        prefix (the shared buffers hold the last batch's)."""
        inputs = self._inputs(rows, frames, like)
        for name in FlowBatch.TENSORS:
            if getattr(inputs, name) is not None:
                getattr(inputs, name).zero_()
        return inputs

    def capture(self, key: tuple, like):
        """A solver graph for key (rows, frames), or one of a pass that records into the prompt
        cache for ("fill" | "record", rows, frames) (`like` is then (batch, recorder)): a voice's
        fill (no cached prefix) or chunks of streams (with one)."""
        t0 = time.perf_counter()
        if key[0] in ("fill", "record"):
            batch, record = like
            flow_inputs = self._zeroed_inputs(key[1], key[2], batch)
            # the recorder's own static tensors: slots (the trash slot until a replay: the capture's
            # warm-up runs write too), ends and the context it collects
            static = type(record)(record.cache, torch.full_like(record.slots, record.cache.trash),
                                  torch.zeros_like(record.ends), torch.zeros_like(record.ctx))
            graph, output = self.capture_fn(lambda: EagerSolver.run(self, flow_inputs, static))
            inputs = (flow_inputs, static)
        else:
            inputs = self._zeroed_inputs(*key, like)
            graph, output = self.capture_fn(lambda: EagerSolver.run(self, inputs))
        log.debug("captured the flow solver for %s in %.2f s", key, time.perf_counter() - t0)
        return self.keep(key, graph, inputs, output)

    def graphable(self, rows: int, frames: int) -> bool:
        return (not self.failed and rows in self.buckets and frames <= self.max_frames
                and frames % self.frame_bucket == 0)

    @staticmethod
    def _load(inputs: FlowBatch, batch: FlowBatch, key) -> None:
        """Copy batch's tensors into a graph's static inputs."""
        for name in FlowBatch.TENSORS:
            buf, src = getattr(inputs, name), getattr(batch, name)
            if (buf is None) != (src is None):
                raise RuntimeError(f"flow solver graph {key}: input {name} is "
                                   f"{'missing' if src is None else 'unexpected'}")
            if buf is not None:
                buf.copy_(src)

    def run_recording(self, batch: FlowBatch, record) -> torch.Tensor:
        """A pass that records into the prompt cache (prompt_cache.py): a voice's fill or chunks of
        streams, from a graph when the shape has one."""
        kind = "fill" if batch.ctx is None else "record"   # their static inputs differ (ctx)
        key = (kind, batch.mu.size(0), batch.mu.size(2))
        entry = None
        if not self.record_failed and self.graphable(*key[1:]):   # a failed capture leaves the rest on graphs
            entry = self.graph_for(key, (batch, record), f"prompt cache {kind}", flag="record_failed")
        if entry is None:
            return self.run(batch, record)
        graph, (inputs, static), output = entry
        self._load(inputs, batch, key)
        for name in ("slots", "ends"):
            getattr(static, name).copy_(getattr(record, name))
        graph.replay()
        record.ctx.copy_(static.ctx)
        return output.clone()

    def __call__(self, batch: FlowBatch) -> torch.Tensor:
        key = (batch.mu.size(0), batch.mu.size(2))
        entry = self.graph_for(key, batch, "flow solver") if self.graphable(*key) else None
        if entry is None:
            return self.run(batch)
        graph, inputs, output = entry
        self._load(inputs, batch, key)
        graph.replay()
        return output.clone()


class GraphEncoder(GraphCache, RowEncoder):
    """RowEncoder replayed from CUDA graphs for up to ENCODER_GRAPH_MAX_ROWS rows: rows bucketed as the solver's, tokens up to a multiple
    of FRAME_BUCKET / stride (so the encoder's frames are the solver's frame bucket). The extra
    rows (n = lens = 0) and tokens (id -1, past n) are padding the masks hide; the caller keeps
    the real rows and frames. Past the largest bucket, or if a capture fails, it runs eagerly."""

    def __init__(self, flow, max_batch_size: int, frame_bucket: int = FRAME_BUCKET, max_frames: int = MAX_FRAMES,
                 pool=None):
        super().__init__(flow)
        # Only small batches: there the encoder is launch bound (batch 1: 40 -> 34 ms per flow call,
        # docs/benchmarks.md); at 64 rows graphs gained nothing and their memory did not fit the A10 cap.
        self.buckets = batch_buckets(min(max_batch_size, ENCODER_GRAPH_MAX_ROWS))
        self.stride = int(flow.token_mel_ratio)
        self.token_bucket = max(1, frame_bucket // self.stride)
        self.max_tokens = -(-max_frames // frame_bucket) * self.token_bucket
        self.lookahead = int(flow.pre_lookahead_len)
        self.init_graphs(pool)   # (rows, tokens) -> (graph, (ids, n, lens, streaming), mu)

    def bucket(self, rows: int, t: int) -> Optional[tuple[int, int]]:
        if self.failed or rows > self.buckets[-1] or t > self.max_tokens:
            return None
        return next(b for b in self.buckets if b >= rows), -(-t // self.token_bucket) * self.token_bucket

    def buffers(self, key: tuple[int, int], device: torch.device) -> tuple:
        """The graph's static inputs for bucket `key`: ids (rows, tokens + look-ahead), n, lens, streaming."""
        rows, t = key
        return (torch.full((rows, t + self.lookahead), -1, dtype=torch.int64, device=device),
                torch.zeros(rows, dtype=torch.int64, device=device), torch.zeros(rows, dtype=torch.int64, device=device),
                torch.zeros(rows, dtype=torch.bool, device=device))

    def capture(self, key: tuple[int, int], device: torch.device):
        inputs = self.buffers(key, device)
        ids, n, lens, streaming = inputs
        graph, mu = self.capture_fn(lambda: RowEncoder.__call__(self, ids, n, lens, key[1], streaming))
        return self.keep(key, graph, inputs, mu)

    def __call__(self, ids: torch.Tensor, n: torch.Tensor, lens: torch.Tensor, t: int,
                 streaming: torch.Tensor) -> torch.Tensor:
        key = self.bucket(ids.size(0), t)
        if key is None or ids.size(1) > key[1] + self.lookahead:
            return super().__call__(ids, n, lens, t, streaming)
        entry = self.graph_for(key, ids.device, "flow encoder")
        if entry is None:
            return super().__call__(ids, n, lens, t, streaming)
        graph, (b_ids, b_n, b_lens, b_streaming), mu = entry
        rows = ids.size(0)
        b_ids.fill_(-1)
        b_ids[:rows, :ids.size(1)] = ids
        for buf, src in ((b_n, n), (b_lens, lens), (b_streaming, streaming)):
            buf.zero_()
            buf[:rows] = src
        graph.replay()
        return mu[:rows].clone()


class GraphHift(GraphCache, BatchedHift):
    """BatchedHift whose network (after the per-request excitation, which keeps each request's own
    generator) replays from CUDA graphs for up to HIFT_GRAPH_MAX_ROWS rows: rows to a power of
    two, frames to a multiple of HIFT_FRAME_BUCKET, always the masked path (BatchedHift.masked),
    which makes the padding invisible. Larger calls, or all after a failed capture, run eagerly."""

    def __init__(self, hift, max_batch_size: int, pool=None):
        super().__init__(hift)
        self.buckets = batch_buckets(min(max_batch_size, HIFT_GRAPH_MAX_ROWS))
        self.init_graphs(pool)   # (rows, frames) -> (graph, (mel, source, lengths), wav)

    def bucket(self, rows: int, frames: int) -> Optional[tuple[int, int]]:
        if self.failed or rows > self.buckets[-1] or frames > HIFT_MAX_FRAMES:
            return None
        return next(b for b in self.buckets if b >= rows), -(-frames // HIFT_FRAME_BUCKET) * HIFT_FRAME_BUCKET

    def buffers(self, key: tuple[int, int], like: torch.Tensor) -> tuple:
        """The graph's static inputs: mel (rows, 80, frames), source (rows, 1, frames * 480), lengths."""
        rows, frames = key
        dev = like.device
        return (torch.zeros(rows, like.size(1), frames, device=dev, dtype=like.dtype),
                torch.zeros(rows, 1, frames * self.hift.samples_per_frame, device=dev),
                torch.zeros(rows, dtype=torch.int64, device=dev))

    def capture(self, key: tuple[int, int], like: torch.Tensor):
        inputs = self.buffers(key, like)
        graph, wav = self.capture_fn(lambda: self.masked(*inputs))
        return self.keep(key, graph, inputs, wav)

    def network(self, mel: torch.Tensor, source: torch.Tensor, lengths: torch.Tensor, equal: bool) -> torch.Tensor:
        key = self.bucket(mel.size(0), mel.size(2))
        if key is None:
            return super().network(mel, source, lengths, equal)
        entry = self.graph_for(key, mel, "HiFT")
        if entry is None:
            return super().network(mel, source, lengths, equal)
        graph, (b_mel, b_source, b_lengths), wav = entry
        rows, frames = mel.size(0), mel.size(2)
        for buf in (b_mel, b_source, b_lengths):
            buf.zero_()
        b_mel[:rows, :, :frames] = mel
        b_source[:rows, :, :source.size(2)] = source
        b_lengths[:rows] = lengths
        graph.replay()
        return wav[:rows, :source.size(2)].clone()
