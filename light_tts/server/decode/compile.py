"""torch.compile of the estimator and HiFT (--load_jit), and the start-up warm-up that makes the
first request pay neither compilation nor CUDA-graph capture.

Compilation uses dynamic shapes (batch and frames vary per call); the warm-up runs every batch
bucket at the common frame buckets, through the same solver the server uses, so the graphs are
captured (cuda_graph.GraphSolver) and the compiled kernels built before the process says ready.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

log = logging.getLogger("lighttts")

WARM_FRAMES = (100, 200, 300, 400, 500, 600, 700, 800)   # flow frames (prompt + sentence so far)
# HiFT chunks, at GraphHift's 16-frame buckets: first chunks are 2 x (25-49) tokens (the official first
# hop, padded to the prompt) with nothing cached, so 50-98 frames; later ones 2 x hop + 8 cached frames
WARM_HIFT_FRAMES = (64, 80, 96, 112, 208)
WARM_FILL_FRAMES = (100, 200, 300, 400)                 # prompt-cache fills: prompts of 2-8 s ...
WARM_FILL_VOICES = (1, 2, 4, 8)                         # ... of up to prompt_cache.FILL_ROWS voices
# chunks of streams: a hop's own frames (<= 100 tokens), and 400 for rows that recompute a hop
# they had no room to keep (captured while serving at 16 and 32 rows, 1.5 s each, without it)
WARM_RECORD_FRAMES = (100, 200, 300, 400)
# A long sentence streamed alone (or beside one other) reaches the graphs' largest frame buckets: a
# 60 s sentence as the first request after start captured three graphs at 1000-1400 frames while
# serving, 1.3-1.5 s each (docs/benchmarks.md); larger batches of such lengths are rare and costly
# to capture, so only these rows are warmed past WARM_FRAMES.
WARM_LONG_ROWS = 2


def first_hop_hift_frames(first_hop: int) -> tuple:
    """HiFT lengths a short first hop (--decode_first_hop N) adds: its first chunk is 2N mel frames,
    its second 2 x (the official first hop - N) + 8 cached frames, and the official first hop is 25-49
    tokens (prompt padding): every 16-frame bucket up to there (cuda_graph.HIFT_FRAME_BUCKET)."""
    from light_tts.server.decode.cuda_graph import HIFT_FRAME_BUCKET, HIFT_MAX_FRAMES
    if not 0 < first_hop < 49:   # from 49 tokens on the schedule is always the official one
        return ()
    top = min(HIFT_MAX_FRAMES, max(2 * first_hop, 2 * (49 - first_hop) + 8))
    return tuple(range(HIFT_FRAME_BUCKET, top + HIFT_FRAME_BUCKET, HIFT_FRAME_BUCKET))


def compile_engine(engine, estimator: bool = True):
    """Swap the engine's HiFT network for compiled versions; returns the compiled estimator step
    (or None with estimator=False)."""
    step = torch.compile(engine.flow.estimator, dynamic=True) if estimator else None
    if engine.hift is not None:   # CosyVoice3's per-row causal HiFT stays eager
        engine.hift.decode_equal = torch.compile(engine.hift.hift.decode, dynamic=True)
        engine.hift.decode_masked = torch.compile(engine.hift._decode_masked, dynamic=True)
    return step


@torch.inference_mode()
def warm_up(engine, max_batch_size: int, frames: Sequence[int] = WARM_FRAMES,
            hift_frames: Sequence[int] = WARM_HIFT_FRAMES, first_hop: int = 0) -> float:
    """Run the encoder and the solver for every batch bucket x frame bucket (up to the graphs' largest
    frames for batches of WARM_LONG_ROWS) and HiFT for every batch bucket (with the lengths a short
    first hop adds)."""
    from light_tts.server.decode.batched_flow import FlowBatch
    from light_tts.server.decode.cuda_graph import FRAME_BUCKET, MAX_FRAMES, batch_buckets
    hift_frames = sorted(set(hift_frames) | set(first_hop_hift_frames(first_hop)))
    long_frames = tuple(range(max(frames) + FRAME_BUCKET, MAX_FRAMES + 1, FRAME_BUCKET))
    t0 = time.perf_counter()
    flow = engine.flow
    p = next(flow.flow.parameters())
    dev, dtype = p.device, p.dtype
    c = flow.flow.output_size
    k, stride = flow.flow.pre_lookahead_len, flow.flow.token_mel_ratio
    buckets = batch_buckets(max_batch_size)
    for n, b in enumerate(buckets, 1):
        for t in tuple(frames) + (long_frames if b <= WARM_LONG_ROWS else ()):
            tokens = t // stride   # the encoder's bucket for these frames (GraphEncoder captures it)
            full = lambda v, dt=torch.int64: torch.full((b,), v, device=dev, dtype=dt)
            flow.encoder(torch.zeros(b, tokens + k, device=dev, dtype=torch.int64), full(tokens + k), full(tokens),
                         tokens, full(True, torch.bool))
            rb, tb = flow.solver.bucket(b, t)
            zeros = lambda *shape, dt=dtype: torch.zeros(*shape, device=dev, dtype=dt)
            index = lambda v: torch.full((rb,), v, device=dev, dtype=torch.int32)
            batch = FlowBatch(mu=zeros(rb, c, tb), mask=torch.ones(rb, 1, tb, device=dev, dtype=dtype),
                              spks=zeros(rb, c), cond=zeros(rb, c, tb), lengths=index(tb), streaming=index(1),
                              prefix_start=index(0), prefix_len=index(0), stream_start=index(0), stream_len=index(0),
                              cache=flow.prompt_cache)
            if flow.prompt_cache is not None:
                batch.ctx = flow.prompt_cache.context([], rb)
            if not flow.frame_attention:
                batch.bias = zeros(rb, 1, tb, tb)
            flow.solver(batch)
            cache = flow.prompt_cache
            if cache is not None and cache.stream_cache and t in WARM_RECORD_FRAMES:
                from light_tts.server.decode.prompt_cache import Recorder
                # the same pass keeping what it computes (no target: only the trash slot is written)
                flow.solver.run_recording(batch, Recorder.for_targets(cache, [], rb, tb))
        gens = [torch.Generator(device=dev).manual_seed(0) for _ in range(b)]
        for t in (hift_frames if engine.hift is not None else ()):
            mels = [torch.zeros(1, c, t, device=dev, dtype=engine.hift.dtype) for _ in range(b)]
            engine.hift(mels, [None] * b, gens)
            if b > 1:  # the masked (unequal lengths) path too
                mels[0] = mels[0][:, :, :t - 8]
                engine.hift(mels, [None] * b, gens)
        # a start takes minutes on a GPU (the largest buckets dominate): say how far it is
        log.info("decode warm-up: batch %d done (%d of %d batch sizes) after %.0f s", b, n, len(buckets),
                 time.perf_counter() - t0)
    if engine.hift is None:   # CosyVoice3's causal HiFT: its first calls initialise cuDNN/cuFFT (~0.7 s)
        net = engine.vocoder_net
        for finalize in (False, True):
            for b in (1, 2):
                net.inference(torch.zeros(b, c, 2 * net.right_context + 50, device=dev, dtype=dtype), finalize=finalize)
        # and each new conv shape builds its cuDNN plans: warm the bucketed window lengths
        from light_tts.models.token2wav import CausalVocoder
        t1 = time.perf_counter()
        calls = CausalVocoder.warm_up(net, dev, dtype)
        log.info("decode warm-up: causal HiFT at %d bucket shapes in %.1f s", calls, time.perf_counter() - t1)
    if flow.prompt_cache is not None:   # one-voice fill passes (a new voice's first request)
        flow.prompt_cache.warm_up(flow, WARM_FILL_FRAMES, WARM_FILL_VOICES)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    for runner in engine.runners:   # from now on a capture stalls a request: logged and counted
        if hasattr(runner, "warm"):
            runner.warm = True
    seconds = time.perf_counter() - t0
    log.info("decode warm-up (batch <= %d, %d frame buckets, up to %d frames for batches <= %d) took %.1f s",
             max_batch_size, len(frames), MAX_FRAMES, WARM_LONG_ROWS, seconds)
    return seconds
