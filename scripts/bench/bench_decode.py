"""Decode engine benchmark: batched flow + HiFT per 25-token streaming chunk, beside the plain
one-request-at-a-time path (token2wav.Token2Wav), in one run.

    python scripts/bench/bench_decode.py --model_dir /tmp/lighttts-full --dtype bf16 [--make full]

Workload: a 125-token prompt (5 s) and its first streaming chunk (25 tokens + 3 look-ahead, so the
estimator runs over 300 frames: 250 prompt + 50 new; 1.0 s of audio per request). HiFT gets the
steady-state chunk: 50 new mel frames + 8 cached, with a cached excitation.
Per batch size (default 1/4/16/64) and mode (eager, CUDA graphs, torch.compile, both; `fused`
swaps in the fused estimator: fused_estimator.py) it prints flow and HiFT milliseconds per batched
call and audio seconds per second; then the first-chunk latency at batch 1 (flow + HiFT + the
per-row work, audio on the host) per mode, and the plain path's numbers. Each mode's mels at the
largest batch, and its HiFT audio at 4 rows, are checked against the first mode's (relative L2
error; exit 1 past the dtype's tolerance). A CosyVoice3 directory works too: `fused` is then the
fused DiT (fused_dit.py), the batch table times the flow alone (its causal HiFT runs per window
group, timed inside the first-chunk table), and the compile modes are skipped. Times are medians over --repeat runs after warm-up. Modes that would run past
--budget_s are skipped (said in the output), so the whole run stays within a device call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from light_tts.tools.bench_args import add_model_args, ensure_model  # noqa: E402
from light_tts.server.decode.batched_flow import EagerSolver, RowEncoder  # noqa: E402
from light_tts.server.decode.batched_hift import BatchedHift  # noqa: E402
from light_tts.server.decode.engine import DecodeEngine, fused_step  # noqa: E402
from light_tts.server.decode.process import load_decode_model  # noqa: E402
from light_tts.models.token2wav import Chunk, StreamSchedule, Token2Wav, vocoder_family  # noqa: E402

MODE_PARTS = {"eager", "graphs", "fused", "compile", "eager_small", "cache"}
AUDIO_S_PER_CHUNK = 1.0   # 25 tokens x 2 frames x 480 samples / 24 kHz


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeat: int, device, warmup: int = 2) -> float:
    """Median wall milliseconds (synchronised) of fn()."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


class Workload:
    def __init__(self, flow, hift, prompt_tokens: int, seed: int = 0):
        self.flow, self.hift = flow, hift
        g = torch.Generator().manual_seed(seed)
        self.schedule = StreamSchedule(pre_lookahead_len=flow.pre_lookahead_len)
        self.prompt = torch.randint(0, flow.vocab_size, (prompt_tokens,), generator=g)
        self.feat = torch.randn(2 * prompt_tokens, flow.output_size, generator=g) * 0.5
        self.emb = torch.randn(192, generator=g)
        hop = self.schedule.first_hop(prompt_tokens)
        self.chunk = Chunk(torch.randint(0, flow.vocab_size, (hop + flow.pre_lookahead_len,), generator=g), 0,
                           finalize=False, streaming=True)
        p = next(hift.parameters())
        self.device = p.device
        self.hift_mel = torch.randn(1, flow.output_size, 58, generator=g).to(p.device, p.dtype)
        self.cache_source = torch.zeros(1, 1, self.schedule.source_cache_len, device=p.device)

    def t2w(self, seed: int) -> Token2Wav:
        return Token2Wav(self.flow, self.hift, self.prompt, self.feat, self.emb, self.schedule, seed=seed)

    def rows(self, b: int):
        return [(self.t2w(i), self.chunk) for i in range(b)]


# Relative L2 error allowed between two modes' mels: the fused estimator rounds once per fused op
# instead of once per op, and 10 Euler steps through 30 blocks compound it.
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 2e-2}


def rel_error(got: list, want: list) -> float:
    a = torch.cat([m.float().flatten() for m in got])
    b = torch.cat([m.float().flatten() for m in want])
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def set_mode(engine: DecodeEngine, flow, mode: str, max_batch: int, compiled: dict, cache_gb: float) -> None:
    step = engine.flow.estimator
    engine.flow.prompt_cache = None
    if "fused" in mode:
        if "fused" not in compiled:
            compiled["fused"] = fused_step(flow.decoder.estimator)   # the family's: U-Net or DiT
        step = compiled["fused"]
        if "cache" in mode:
            if "cache" not in compiled:
                from light_tts.server.decode.prompt_cache import PromptCache
                compiled["cache"] = PromptCache.for_flow(flow, step, 10, cache_gb)
            engine.flow.prompt_cache = compiled["cache"]
    if engine.hift is None:   # CosyVoice3: its causal HiFT runs per window group (engine._vocode_windows)
        pass
    elif "graphs" in mode and "eager_small" not in mode:
        from light_tts.server.decode.cuda_graph import GraphHift
        engine.hift = GraphHift(engine.hift.hift, max_batch)
    else:
        engine.hift = BatchedHift(engine.hift.hift)
    if "compile" in mode:
        if "step" not in compiled:
            from light_tts.server.decode.compile import compile_engine
            compiled["step"] = compile_engine(engine)
            compiled["hift"] = (engine.hift.decode_equal, engine.hift.decode_masked)
        step = compiled["step"]
        engine.hift.decode_equal, engine.hift.decode_masked = compiled["hift"]
    if "graphs" in mode:
        from light_tts.server.decode.cuda_graph import GraphEncoder, GraphSolver
        engine.flow.solver = GraphSolver(flow.decoder, step, max_batch_size=max_batch)
    else:
        engine.flow.solver = EagerSolver(flow.decoder, step, 10)
    if "graphs" in mode and "eager_small" not in mode:
        engine.flow.encoder = GraphEncoder(flow, max_batch)
    else:
        engine.flow.encoder = RowEncoder(flow)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--batch_sizes", default="1,4,16,64")
    p.add_argument("--modes", default="eager,graphs,fused,fused+graphs,fused+graphs+cache,compile+graphs",
                   help="comma list of eager | graphs | fused | fused+graphs | compile | compile+graphs; graphs "
                        "modes capture the token encoder and HiFT of small batches too, unless the name has "
                        "+eager_small; fused modes with +cache use the prompt cache (every row has the same "
                        "voice, so after the first call its prompt frames are cached)")
    p.add_argument("--prompt_cache_gb", type=float, default=2.0, help="prompt cache size of the +cache modes")
    p.add_argument("--prompt_tokens", type=int, default=125)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--budget_s", type=float, default=400.0, help="skip further modes past this many seconds")
    args = p.parse_args()
    t_start = time.perf_counter()
    ensure_model(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, dtype {args.dtype}")
    else:
        torch.set_flush_denormal(True)
    flow, hift = load_decode_model(args.model_dir, str(device), args.dtype if device.type == "cuda" else "fp32")
    work = Workload(flow, hift, args.prompt_tokens)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:   # modes are matched by their parts: refuse a misspelt part rather than ignore it
        unknown = set(m.split("+")) - MODE_PARTS
        if unknown:
            p.error(f"mode {m!r}: unknown part(s) {sorted(unknown)}; parts are {sorted(MODE_PARTS)}")
    if device.type != "cuda":
        modes = [m for m in modes if m in ("eager", "fused", "fused+cache")]
    if vocoder_family(hift) == "cosyvoice3" and any("compile" in m for m in modes):
        print("CosyVoice3: the compile modes are CosyVoice2's (skipped); HiFT is timed in the first-chunk table only")
        modes = [m for m in modes if "compile" not in m]
    frames = args.prompt_tokens * 2 + 2 * (work.chunk.tokens.numel() - flow.pre_lookahead_len)
    print(f"workload: prompt {args.prompt_tokens} tokens, chunk {work.chunk.tokens.numel()} tokens "
          f"(estimator over {frames} frames), HiFT 58 frames; repeat {args.repeat}\n")

    rows_out, first_chunk, skipped, errors = [], {}, [], {}
    check_rows = work.rows(max(sizes))
    reference_mels = None
    with torch.inference_mode():
        # the plain path: one request at a time through Token2Wav (flow.inference + hift.inference)
        def plain_chunk():
            work.t2w(0)(work.chunk.tokens, 0, finalize=False, streaming=True)
        plain_ms = timed(plain_chunk, args.repeat, device)
        first_chunk["plain (token2wav)"] = plain_ms
        for b in sizes:
            rows_out.append(("plain, one at a time", b, None, None, b * plain_ms,
                             b * AUDIO_S_PER_CHUNK / (b * plain_ms / 1e3)))

        engine = DecodeEngine(flow, hift)
        compiled: dict = {}
        for mode in modes:
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append(mode)
                continue
            t_mode = time.perf_counter()
            set_mode(engine, flow, mode, max(sizes), compiled, args.prompt_cache_gb)
            for b in sizes:
                rows = work.rows(b)
                flow_ms = timed(lambda: engine.flow(rows), args.repeat, device)
                hift_ms = None
                if engine.hift is not None:
                    mels = [work.hift_mel] * b
                    caches = [work.cache_source] * b
                    gens = [torch.Generator(device=device).manual_seed(i) for i in range(b)]
                    hift_ms = timed(lambda: engine.hift(mels, caches, gens), args.repeat, device)
                total = flow_ms + (hift_ms or 0.0)
                rows_out.append((mode, b, flow_ms, hift_ms, total, b * AUDIO_S_PER_CHUNK / (total / 1e3)))
            mels = engine.flow(check_rows)
            n = min(4, max(sizes))   # HiFT graphs serve small batches only: check at 4 rows
            audio = None if engine.hift is None else [
                a for a, _ in engine.hift([work.hift_mel] * n, [work.cache_source] * n,
                                          [torch.Generator(device=device).manual_seed(i) for i in range(n)])]
            if reference_mels is None:
                reference_mels, reference_audio, reference_mode = mels, audio, mode
            else:
                errors[mode] = rel_error(mels, reference_mels)
                if audio is not None:
                    errors[f"{mode} (HiFT, {n} rows)"] = rel_error(audio, reference_audio)

            def first():  # a fresh request's first chunk, end to end through the engine
                engine.run([(work.t2w(0), work.chunk)])
            first_chunk[mode] = timed(first, args.repeat, device)
            cache = engine.flow.prompt_cache
            if cache is not None:
                def first_new_voice():   # the same with the voice's prompt frames not cached yet
                    cache.entries.clear()
                    first()
                first_chunk[f"{mode}, voice not cached"] = timed(first_new_voice, args.repeat, device)
            print(f"[{mode}: {time.perf_counter() - t_mode:.0f} s incl. compile/capture]", flush=True)

    print("\n| path | batch | flow ms / call | HiFT ms / call | flow+HiFT ms | audio s per s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode, b, f, h, tot, aps in rows_out:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"
        print(f"| {mode} | {b} | {fmt(f)} | {fmt(h)} | {tot:.1f} | {aps:.1f} |")
    print("\n| first chunk, batch 1 | ms (flow + HiFT + per-row work, audio on the host) |")
    print("| --- | ---: |")
    for mode, ms in first_chunk.items():
        print(f"| {mode} | {ms:.1f} |")
    tol = TOLERANCE[args.dtype if device.type == "cuda" else "fp32"]
    bad = {m: e for m, e in errors.items() if e > tol}
    if errors:
        print(f"\nmels at batch {max(sizes)} and HiFT audio against {reference_mode} (relative L2 error, tolerance "
              f"{tol:g}): " + ", ".join(f"{m} {e:.2e}" for m, e in errors.items()))
    if skipped:
        print(f"\nskipped (past --budget_s {args.budget_s:.0f} s): {', '.join(skipped)}")
    if device.type == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB; "
              f"total {time.perf_counter() - t_start:.0f} s")
    if bad:
        print(f"FAILED: mels differ past the tolerance: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
