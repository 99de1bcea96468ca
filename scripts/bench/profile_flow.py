"""Where the flow estimator's time goes on a GPU: one estimator call (one Euler step, CFG doubled
batch) at given (requests, frames), timed eagerly and as a CUDA graph, and the top kernels of the
torch profiler. Prints markdown tables.

    python scripts/bench/profile_flow.py --model_dir /tmp/lighttts-full --dtype bf16 --shapes 1x300,64x300,64x106

A shape RxT is R requests (2R estimator rows with classifier-free guidance) of T frames.
--estimators plain,fused profiles the module-by-module forward and the fused one
(light_tts/server/decode/fused_estimator.py) on the same weights and inputs.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from light_tts.server.decode.batched_flow import BiasEstimator, FrameAttention, attention_bias  # noqa: E402
from light_tts.server.decode.fused_estimator import FusedEstimator  # noqa: E402
from light_tts.models.cosyvoice2 import CosyVoice2Model  # noqa: E402
from light_tts.models.flow.masks import valid_mask  # noqa: E402


def inputs(est, rows: int, frames: int, dtype, dev, fused: bool):
    """One estimator call's inputs; the attention rule as a dense bias (plain) or a FrameAttention
    (fused), every row streaming and without a cached prefix."""
    b = 2 * rows
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=dev).to(dtype)
    mask = valid_mask(torch.full((b,), frames, device=dev), frames)
    index = lambda v: torch.full((b,), v, device=dev, dtype=torch.int32)
    attn = FrameAttention(index(frames), index(1), index(0), index(0), index(0), index(0), branch_rows=rows) if fused else \
        attention_bias(mask, torch.ones(b, dtype=torch.bool, device=dev), est.static_chunk_size, dtype)
    return (rnd(b, 80, frames), mask.to(dtype), rnd(b, 80, frames), torch.full((b,), 0.5, device=dev, dtype=dtype),
            rnd(b, 80), rnd(b, 80, frames), attn)


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


@torch.inference_mode()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default="/tmp/lighttts-full")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--shapes", default="1x300,64x300,64x106")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--estimators", default="plain", help="comma list of plain | fused")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    flow = CosyVoice2Model.from_pretrained(args.model_dir, device="cuda", dtype=dtype, components=("flow",)).flow
    decoder = flow.decoder.estimator
    builders = {"plain": BiasEstimator, "fused": FusedEstimator}
    unknown = set(args.estimators.split(",")) - set(builders)
    if unknown:
        p.error(f"--estimators: unknown {sorted(unknown)}; choose from {sorted(builders)}")
    print(f"# flow estimator on {torch.cuda.get_device_name()} ({args.dtype}), "
          f"{sum(p.numel() for p in decoder.parameters()) / 1e6:.1f} M parameters\n")
    print("| estimator | requests x frames | rows | eager ms / call | CUDA graph ms / call |")
    print("|---|---|---:|---:|---:|")
    profiles = []
    for name in args.estimators.split(","):
        est = builders[name](decoder).eval()
        for shape in args.shapes.split(","):
            rows, frames = (int(v) for v in shape.lower().split("x"))
            x = inputs(decoder, rows, frames, dtype, "cuda", name == "fused")
            eager = time_ms(lambda: est(*x))
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                est(*x)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                est(*x)
            replay = time_ms(graph.replay)
            print(f"| {name} | {rows} x {frames} | {2 * rows} | {eager:.2f} | {replay:.2f} |", flush=True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    est(*x)
                torch.cuda.synchronize()
            profiles.append((f"{name} {shape}", prof))
            del graph
    for shape, prof in profiles:
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.self_device_time_total for e in events) / 3
        n = sum(e.count for e in events) / 3
        print(f"\n## {shape}: {n:.0f} kernels per call, {total / 1e3:.2f} ms GPU time per call\n")
        print("| kernel | calls / call | ms / call | share |")
        print("|---|---:|---:|---:|")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"| {e.key[:90]} | {e.count / 3:.0f} | {e.self_device_time_total / 3e3:.3f} | "
                  f"{e.self_device_time_total / 3 / total:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
