"""The 10-step Euler loop (20 estimator passes with CFG) captured as one CUDA graph per shape.

The estimator launches on the order of a thousand small kernels per pass, so at small batches
launch overhead, not math, sets the latency. Shapes are bucketed: rows up to a power of two
(<= max_batch_size), frames up to a multiple of FRAME_BUCKET; the extra rows and frames are
padding the masks already make invisible (batched_flow.py). Graphs are captured on first use
(warm_up captures the common ones at start), share one memory pool, and read their inputs from
one set of flat buffers sized for the largest bucket (graphs replay one at a time, so sharing is
safe). Shapes past MAX_FRAMES run eagerly.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable

import torch

from light_tts.decode.batched_flow import EagerSolver, FlowBatch

log = logging.getLogger("lighttts")

FRAME_BUCKET = 100
MAX_FRAMES = 1500
MAX_GRAPHS = 96


def batch_buckets(max_batch_size: int) -> list[int]:
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


class GraphSolver(EagerSolver):
    def __init__(self, cfm, step: Callable, max_batch_size: int, n_timesteps: int = 10,
                 frame_bucket: int = FRAME_BUCKET, max_frames: int = MAX_FRAMES):
        super().__init__(cfm, step, n_timesteps)
        self.buckets = batch_buckets(max_batch_size)
        self.frame_bucket = frame_bucket
        self.max_frames = -(-max_frames // frame_bucket) * frame_bucket
        self.graphs: OrderedDict = OrderedDict()   # (rows, frames) -> (graph, inputs, output)
        self.pool = None
        self.buffers: dict = {}
        self.capture_seconds = 0.0

    def bucket(self, rows: int, frames: int) -> tuple[int, int]:
        if frames > self.max_frames or rows > self.buckets[-1]:
            return rows, frames  # eager
        b = next(b for b in self.buckets if b >= rows)
        return b, -(-frames // self.frame_bucket) * self.frame_bucket

    def _inputs(self, rows: int, frames: int, like: FlowBatch) -> FlowBatch:
        """Views of the shared flat buffers with this bucket's shapes (contiguous)."""
        c = like.mu.size(1)
        shapes = {"mu": (rows, c, frames), "mask": (rows, 1, frames), "spks": (rows, c), "cond": (rows, c, frames),
                  "bias": (rows, 1, frames, frames)}
        views = {}
        for name, shape in shapes.items():
            t = getattr(like, name)
            buf = self.buffers.get(name)
            if buf is None:
                big = {"mu": (self.buckets[-1], c, self.max_frames), "mask": (self.buckets[-1], 1, self.max_frames),
                       "spks": (self.buckets[-1], c), "cond": (self.buckets[-1], c, self.max_frames),
                       "bias": (self.buckets[-1], 1, self.max_frames, self.max_frames)}[name]
                buf = self.buffers[name] = torch.zeros(big, device=t.device, dtype=t.dtype).view(-1)
            n = 1
            for d in shape:
                n *= d
            views[name] = buf[:n].view(shape)
        return FlowBatch(**views, frames=[], prompt_frames=[])

    def capture(self, key: tuple[int, int], like: FlowBatch):
        t0 = time.perf_counter()
        inputs = self._inputs(*key, like)
        for name in ("mu", "mask", "spks", "cond", "bias"):
            getattr(inputs, name).zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: allocator, cuBLAS/cuDNN plans, torch.compile
                EagerSolver.__call__(self, inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = EagerSolver.__call__(self, inputs)
        self.pool = graph.pool()
        self.graphs[key] = (graph, inputs, output)
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        self.capture_seconds += time.perf_counter() - t0
        log.debug("captured the flow solver for batch %d x %d frames in %.2f s", *key, time.perf_counter() - t0)
        return self.graphs[key]

    def __call__(self, batch: FlowBatch) -> torch.Tensor:
        key = (batch.mu.size(0), batch.mu.size(2))
        if key[0] not in self.buckets or key[1] > self.max_frames or key[1] % self.frame_bucket:
            return EagerSolver.__call__(self, batch)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.capture(key, batch)
        else:
            self.graphs.move_to_end(key)
        graph, inputs, output = entry
        for name in ("mu", "mask", "spks", "cond", "bias"):
            getattr(inputs, name).copy_(getattr(batch, name))
        graph.replay()
        return output.clone()
