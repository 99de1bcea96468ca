"""DecodeEngine: the next chunk of many sentences -> audio, with one flow and one HiFT call.

The schedule stays per sentence in light_tts.models.token2wav.StreamingDecoder (one implementation for the
reference and the server): the caller takes each decoder's `next_chunk()` and hands the
(Token2Wav, Chunk) pairs here. Token2Wav keeps the per-request state (prompt, speaker, HiFT
cache, NSF generator) and does the per-row work around the vocoder (`hift_input`,
`hift_output`); the engine batches the two model calls in between.

Speed paths (build_engine): on CUDA the fused estimator (fewer kernels, same math: fused_estimator.py;
CosyVoice3's DiT: fused_dit.py),
with --decode_prompt_cache_gb the prompt cache (a voice's fixed prompt frames computed once, and
with --decode_stream_cache a stream's frames from its earlier chunks: prompt_cache.py), CUDA graphs
of the Euler loop and, for small batches, of the token encoder and
the HiFT network (unless disabled); torch.compile of HiFT, and of the estimator
when it is not the fused one (--load_jit); a TensorRT estimator (--load_trt: it replaces the fused
estimator and the Euler loop's graph, the loop runs eagerly around the engine, and --load_jit is
ignored).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from light_tts.models.token2wav import vocoder_family
from light_tts.server.decode.batched_flow import BatchedFlow, EagerSolver
from light_tts.server.decode.batched_hift import BatchedHift

log = logging.getLogger("lighttts")


class DecodeEngine:
    def __init__(self, flow, hift, solver=None):
        self.flow = BatchedFlow(flow, solver)
        self.vocoder_net = hift
        # CosyVoice2's HiFT runs as one padded batch (BatchedHift). CosyVoice3's causal HiFT: each
        # row's F0 and excitation over its sentence so far, then one decode call per group of rows
        # whose bounded windows have the same length (token2wav.CausalVocoder): padding would change
        # the samples at a window's end, so rows of different lengths do not share a call.
        self.hift = BatchedHift(hift) if vocoder_family(hift) == "cosyvoice2" else None

    @property
    def prompt_cache(self):
        """The flow's prompt cache (decode/prompt_cache.py) or None: what the decode process asks."""
        return self.flow.prompt_cache

    @property
    def runners(self) -> tuple:
        """The solver, encoder and HiFT runners (CUDA-graph runners on a GPU: cuda_graph.GraphCache)."""
        return tuple(r for r in (self.flow.solver, self.flow.encoder, self.hift) if r is not None)

    @property
    def late_captures(self) -> int:
        """CUDA graphs captured while serving (a shape the warm-up missed): the decode stats."""
        return sum(getattr(r, "late_captures", 0) for r in self.runners)

    @torch.inference_mode()
    def run(self, rows: Sequence) -> list:
        """rows: (Token2Wav, Chunk) pairs, at most one per Token2Wav. Returns per row float32
        audio [samples] (numpy) or the exception that failed that row."""
        out: list = [None] * len(rows)
        mels = self.flow(rows)
        if self.hift is None:
            return self._vocode_windows(rows, mels)
        hift_rows = []
        for i, ((t2w, chunk), mel) in enumerate(zip(rows, mels)):
            if isinstance(mel, Exception):
                out[i] = mel
                continue
            try:
                mel, cache_source = t2w.hift_input(mel, chunk.offset, chunk.finalize, chunk.speed)
                hift_rows.append((i, mel, cache_source))
            except Exception as e:  # a bad row fails alone
                out[i] = e
        if hift_rows:
            results = self.hift([m.to(self.hift.dtype) for _, m, _ in hift_rows], [c for _, _, c in hift_rows],
                                [rows[i][0].generator for i, _, _ in hift_rows])
            for (i, mel, _), (speech, source) in zip(hift_rows, results):
                t2w, chunk = rows[i]
                out[i] = t2w.hift_output(speech, source, mel, chunk.finalize)[0].numpy()
        return out

    def _vocode_windows(self, rows: Sequence, mels: list) -> list:
        """CosyVoice3's vocoder step for the rows' flow outputs (or their exceptions)."""
        out = list(mels)
        groups: dict = {}
        for i, ((t2w, chunk), mel) in enumerate(zip(rows, mels)):
            if isinstance(mel, Exception):
                continue
            try:
                window = t2w.vocoder.window(t2w.new_frames(mel, chunk.offset), chunk.finalize, chunk.speed)
            except Exception as e:  # a bad row fails alone
                out[i] = e
                continue
            groups.setdefault((window.mel.shape[2], window.finalize), []).append((i, window))
        for (_, finalize), group in groups.items():
            try:
                speech = self.vocoder_net.decode(torch.cat([w.mel for _, w in group]),
                                                 torch.cat([w.source for _, w in group]), finalize)
            except Exception as e:
                for i, _ in group:
                    out[i] = e
                continue
            for j, (i, window) in enumerate(group):
                out[i] = rows[i][0].vocoder.emit(speech[j:j + 1], window)[0].numpy()
        return out

    @torch.inference_mode()
    def warm_prompts(self, t2ws: Sequence) -> int:
        """Fill the prompt cache for these requests' voices now (the decode process does it while
        idle, before their first chunk is due); returns how many were filled. No-op without a cache."""
        cache = self.flow.prompt_cache
        if cache is None:
            return 0
        misses = cache.misses
        cache.prefixes(self.flow, [(t, None) for t in t2ws], count=False)
        return cache.misses - misses

    def release(self, t2ws: Sequence) -> None:
        """These sentences end (finished, failed or aborted): free their cached stream frames now."""
        cache = self.flow.prompt_cache
        if cache is not None:
            for t2w in t2ws:
                cache.release(t2w)


def fused_step(estimator):
    """The fused estimator step of this family (CosyVoice2's U-Net or CosyVoice3's DiT), which takes
    a FrameAttention and can continue a prompt cache's prefix. Build it after the weights are cast."""
    from light_tts.models.flow.dit import DiT
    if isinstance(estimator, DiT):
        from light_tts.server.decode.fused_dit import FusedDiT
        return FusedDiT(estimator)
    from light_tts.server.decode.fused_estimator import FusedEstimator
    return FusedEstimator(estimator)


def build_engine(flow, hift, device: str, *, cuda_graph: bool = True, load_jit: bool = False,
                 load_trt: bool = False, model_dir: Optional[str] = None, data_type: str = "fp32",
                 max_batch_size: int = 16, warmup: bool = True, fused: bool = True,
                 prompt_cache_gb: float = 0.0, stream_cache: bool = False, first_hop: int = 0):
    """The engine with the speed paths the flags ask for (CPU: always eager, said in the log).
    `fused`: the fused estimator on CUDA (its Triton kernel needs a GPU; TensorRT replaces it).
    `prompt_cache_gb` > 0: a prompt cache of that size for streaming rows (fused estimator only),
    which keeps the streams' frames too with `stream_cache`. `first_hop`: the streaming schedule's
    short first hop (0: the official), whose shapes the warm-up adds. A CosyVoice3 (DiT) flow gets the same
    paths with its own fused step (fused_dit.py); TensorRT is CosyVoice2's only, and its causal HiFT
    runs per window group (eager)."""
    on_cuda = device.startswith("cuda")
    if load_trt and not on_cuda:
        raise RuntimeError("--load_trt needs a CUDA GPU (this decode process runs on the CPU)")
    engine = DecodeEngine(flow, hift)
    dit = engine.hift is None
    if dit:
        if load_trt:
            raise RuntimeError("--load_trt: the TensorRT estimator exists for CosyVoice2's U-Net only, "
                               "not CosyVoice3's DiT; start without --load_trt")
    graphs = on_cuda and cuda_graph
    if graphs:
        from light_tts.server.decode.cuda_graph import GraphEncoder, GraphHift
        # one memory pool for every decode graph: they replay one after the other and their outputs
        # are copied out at once, so their intermediates share memory (only the outputs add up)
        pool = torch.cuda.graph_pool_handle()
        engine.flow.encoder = GraphEncoder(flow, max_batch_size, pool=pool)
        if not dit:
            engine.hift = GraphHift(hift, max_batch_size, pool=pool)   # before --load_jit compiles its network
    step = engine.flow.estimator
    fused = fused and on_cuda and not load_trt
    if stream_cache and prompt_cache_gb <= 0:
        log.warning("--decode_stream_cache ignored: the streams' frames live in the prompt cache; "
                    "set --decode_prompt_cache_gb too")
    if prompt_cache_gb > 0 and not fused:
        log.warning("--decode_prompt_cache_gb %g ignored: the prompt cache needs the fused estimator on a GPU "
                    "(not --load_trt, --disable_fused_estimator or a CPU)", prompt_cache_gb)
    if fused:
        step = fused_step(flow.decoder.estimator)
        if prompt_cache_gb > 0:
            from light_tts.server.decode.prompt_cache import PromptCache
            engine.flow.prompt_cache = PromptCache.for_flow(flow, step, engine.flow.solver.n_timesteps, prompt_cache_gb,
                                                             streams=stream_cache)
    if load_trt:
        from light_tts.server.decode.trt import TrtEstimator
        step = TrtEstimator.load_or_build(engine.flow.estimator, model_dir, data_type, device,
                                          max_batch_size=2 * max_batch_size)
    elif load_jit:
        if on_cuda:
            from light_tts.server.decode.compile import compile_engine
            # Inductor did not speed up the estimator inside a CUDA graph (docs/benchmarks.md);
            # the fused one is already the faster graph, so only HiFT is compiled with it.
            compiled = compile_engine(engine, estimator=not fused)
            step = step if fused else compiled
        else:
            log.info("--load_jit: torch.compile skipped on the CPU (eager decode)")
    if graphs and not load_trt:
        from light_tts.server.decode.cuda_graph import GraphSolver
        engine.flow.solver = GraphSolver(flow.decoder, step, max_batch_size=max_batch_size, pool=pool)
    else:
        engine.flow.solver = EagerSolver(flow.decoder, step, engine.flow.solver.n_timesteps)
    if warmup and on_cuda:
        from light_tts.server.decode.compile import warm_up
        warm_up(engine, max_batch_size, first_hop=first_hop)
    return engine
