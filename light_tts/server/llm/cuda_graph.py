"""CUDA graphs of the decode step (ModelRunner.decode) for batch sizes up to --graph_max_batch_size.

One graph per size in `batch_sizes` (1, 2, 4, 8, then every 8), captured at start into one
shared memory pool, largest first. A batch of B rows replays the smallest graph of >= B rows;
the extra rows are padding: token 0, the padding request row of req_to_token (every entry the
pool's padding slot), length 1, new slot = the padding slot. They compute garbage that only
ever lands in the padding slot and is never read back.

With a batched (or greedy) sampler the graph also draws the step's tokens (Sampler.draw): the
forward and the ~25 small sampling kernels replay as one launch and the host reads one [B] tensor
of tokens; the exact sampler (torch.Generator per request) runs outside, on the graph's logits.

Static inputs are one int64 buffer [4 (+ 3 + W), max_bs] (tokens, req row, length, slot, then the
sampler's rows: seed, counter, flags, RAS window) filled by one host-to-device copy per step from
a pinned buffer. The attention kernels get `max_len` = --graph_max_len_in_batch (a fixed launch
shape); longer batches run eagerly.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from light_tts.server.llm.model_runner import ModelRunner
from light_tts.server.llm.sampler import Sampler, SampleRow

log = logging.getLogger("lighttts")


def graph_batch_sizes(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_bs] + list(range(16, max_bs + 1, 8))
    if max_bs not in sizes:
        sizes.append(max_bs)
    return sizes


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_bs: int, max_len: int, sampler: Optional[Sampler] = None):
        self.runner = runner
        self.max_bs = int(max_bs)
        self.max_len = int(max_len)
        self.sampler = sampler                      # draws inside the graph when set
        self.sizes = graph_batch_sizes(self.max_bs)
        dev = runner.device
        # padding column: token 0, the padding request row, length 1, the padding slot; then the
        # sampler's seed 0, counter 0, no flags, an empty window
        pad = [0, runner.reqs.pad_row, 1, runner.pool.pad_slot]
        if sampler is not None:
            pad += [0, 0, 0] + [-1] * sampler.window
        self.pad = np.asarray(pad, dtype=np.int64)[:, None]
        self.inputs = torch.zeros((len(pad), self.max_bs), dtype=torch.int64, device=dev)
        self.host = torch.zeros((len(pad), self.max_bs), dtype=torch.int64, pin_memory=True)
        self.host_np = self.host.numpy()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple] = {}

    def _run(self, bs: int) -> tuple:
        t = self.inputs[:, :bs]
        logits = self.runner.decode(t[0], t[1].to(torch.int32), t[2].to(torch.int32), t[3], self.max_len)
        return logits, (self.sampler.draw(logits, t[4:]) if self.sampler is not None else None)

    @torch.inference_mode()
    def capture(self) -> None:
        self.inputs.copy_(torch.from_numpy(np.broadcast_to(self.pad, self.inputs.shape).copy()))
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):
                for _ in range(2):       # warm up (Triton compiles, allocator settles)
                    self._run(bs)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.outputs[bs] = self._run(bs)
                if pool is None:
                    pool = g.pool()
                self.graphs[bs] = g
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def can_run(self, bs: int, max_len: int) -> bool:
        return bs <= self.max_bs and max_len <= self.max_len

    def run(self, tokens: list, req_rows: list, seq_lens: list, slots: list,
            sample_rows: Optional[Sequence[SampleRow]] = None) -> tuple:
        """-> (logits [B, V], tokens [B] drawn in the graph or None without an in-graph sampler)."""
        bs = len(tokens)
        size = next(s for s in self.sizes if s >= bs)
        h = self.host_np
        h[0, :bs], h[1, :bs], h[2, :bs], h[3, :bs] = tokens, req_rows, seq_lens, slots
        if self.sampler is not None:
            self.sampler.inputs(sample_rows, out=h[4:, :bs])
        h[:, bs:size] = self.pad
        self.inputs.copy_(self.host, non_blocking=True)   # whole (a few KB): contiguous, so a real async copy
        self.graphs[size].replay()
        logits, drawn = self.outputs[size]
        return logits[:bs], (drawn[:bs] if drawn is not None else None)


def try_capture(runner: ModelRunner, max_bs: int, max_len: int,
                sampler: Optional[Sampler] = None) -> Optional[DecodeGraphs]:
    """Captured graphs, or None (with a warning) when capture fails, e.g. reference kernels on CUDA
    (they read lengths on the host, which a graph cannot)."""
    try:
        graphs = DecodeGraphs(runner, max_bs, max_len, sampler)
        graphs.capture()
        return graphs
    except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
        log.warning("CUDA graph capture failed, decoding without graphs: %s: %s", type(e).__name__, e)
        torch.cuda.synchronize()
        return None
