"""Run every Triton kernel of light_tts/kernels at the real model's sizes on a GPU, check it against
the plain-PyTorch reference (light_tts/kernels/reference.py) and time both.

    python scripts/bench/bench_kernels.py [--dtype bf16|fp16|fp32] [--quick] [--sweep]

Shapes: Qwen2-0.5B attention (14 q heads, 2 kv heads, head_dim 64, hidden 896), batches 1..128,
sequences 200..2000 (decode lengths drawn in [seq/2, seq], max_len = seq). Prints a markdown
table: max abs error vs the reference, the tolerance, and median times (triton.testing.do_bench)
of the Triton kernel and of the reference. --sweep adds decode attention timings for every
block_seq choice (to tune decode_attention.pick_block_seq). Exit status 1 when any check fails.
About a minute on an H100.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from light_tts.kernels import reference as ref  # noqa: E402
from light_tts.kernels.context_attention import context_attention, context_attention_int8  # noqa: E402
from light_tts.kernels.decode_attention import BLOCK_SEQS, decode_attention, decode_attention_int8, pick_block_seq  # noqa: E402
from light_tts.kernels.int8_kv import store_kv_int8  # noqa: E402
from light_tts.kernels.rms_norm import add_rms_norm, rms_norm  # noqa: E402
from light_tts.kernels.silu_mul import silu_mul  # noqa: E402
from light_tts.kernels.rotary import rotary  # noqa: E402
from light_tts.kernels.store_kv import store_kv  # noqa: E402

HQ, HKV, D, HIDDEN = 14, 2, 64, 896
INTERMEDIATE = 4864   # Qwen2-0.5B MLP
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Max abs error allowed on O(1) outputs (attention: weighted means of unit-normal values).
ATTN_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
def elem_tol(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """Two rounding steps of `dtype` at the reference's largest magnitude (norm / rotary outputs)."""
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
    return 2 * eps * max(1.0, ref.float().abs().max().item())
# Shapes (--quick keeps the first and last of each).
ELEM_TOKENS = (1, 128, 2048)
CONTEXT_CASES = ((1, 0, 200), (1, 0, 1000), (4, 0, 500), (8, 300, 100))  # (batch, cached prefix, new tokens)
DECODE_BATCHES = (1, 8, 32, 64, 128)
DECODE_SEQS = (200, 2000)

rows: list[tuple] = []
failures: list[str] = []


def ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def record(kernel: str, case: str, err: float, tol: float, t_triton: float, t_ref: float) -> None:
    ok = err <= tol
    if not ok:
        failures.append(f"{kernel} {case}: max err {err:.3g} > {tol:.3g}")
    rows.append((kernel, case, f"{err:.2e}", f"{tol:.0e}", "ok" if ok else "FAIL", f"{t_triton * 1e3:.1f}",
                 f"{t_ref * 1e3:.1f}", f"{t_ref / t_triton:.1f}x"))
    print(f"  {kernel:24s} {case:28s} err {err:.2e} {'ok' if ok else 'FAIL':4s} "
          f"triton {t_triton * 1e3:8.1f} us  ref {t_ref * 1e3:9.1f} us", flush=True)


def ends(xs: tuple, quick: bool) -> tuple:
    return (xs[0], xs[-1]) if quick and len(xs) > 2 else xs


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class Pool:
    """A one-layer pool with `lengths[b]` random tokens per request at scattered slots."""

    def __init__(self, lengths: list[int], dtype: torch.dtype, dev: torch.device, g: torch.Generator, int8=False):
        self.num_slots = sum(lengths) + 64
        max_len = max(lengths)
        self.req_to_token = torch.full((len(lengths), max_len), self.num_slots, dtype=torch.int32, device=dev)
        order = torch.randperm(self.num_slots, generator=g, device=dev).int()
        used = 0
        for b, n in enumerate(lengths):
            self.req_to_token[b, :n] = order[used:used + n]
            used += n
        shape = (self.num_slots + 1, HKV, D)
        k = torch.randn(shape, generator=g, device=dev).to(dtype)
        v = torch.randn(shape, generator=g, device=dev).to(dtype)
        if int8:
            slots = torch.arange(self.num_slots + 1, device=dev)
            self.k = torch.empty(shape, dtype=torch.int8, device=dev)
            self.v = torch.empty_like(self.k)
            self.k_scale = torch.empty(shape[:2], dtype=torch.float32, device=dev)
            self.v_scale = torch.empty_like(self.k_scale)
            store_kv_int8(k, v, self.k, self.k_scale, self.v, self.v_scale, slots)
            self.caches = (self.k, self.k_scale, self.v, self.v_scale)
        else:
            self.caches = (k, v)
        self.b_req_idx = torch.arange(len(lengths), dtype=torch.int32, device=dev)


def bench_elementwise(dtype, dev, g, quick):
    print("store_kv / store_kv_int8 / rms_norm / add_rms_norm / silu_mul / rotary", flush=True)
    for n in ends(ELEM_TOKENS, quick):
        qkv = torch.randn(n, (HQ + 2 * HKV) * D, generator=g, device=dev).to(dtype)
        k = qkv[:, HQ * D:(HQ + HKV) * D].view(n, HKV, D)
        v = qkv[:, (HQ + HKV) * D:].view(n, HKV, D)
        num_slots = 4 * n + 16
        slots = torch.randperm(num_slots, generator=g, device=dev)[:n]
        kc, vc = (torch.zeros(num_slots + 1, HKV, D, dtype=dtype, device=dev) for _ in range(2))
        kr, vr = kc.clone(), vc.clone()
        store_kv(k, v, kc, vc, slots)
        ref.store_kv(k, v, kr, vr, slots)
        record("store_kv", f"N={n}", max(max_err(kc, kr), max_err(vc, vr)), 0.0,
               ms(lambda: store_kv(k, v, kc, vc, slots)), ms(lambda: ref.store_kv(k, v, kr, vr, slots)))

        c8 = [torch.zeros(num_slots + 1, HKV, D, dtype=torch.int8, device=dev) for _ in range(4)]
        s8 = [torch.zeros(num_slots + 1, HKV, dtype=torch.float32, device=dev) for _ in range(4)]
        store_kv_int8(k, v, c8[0], s8[0], c8[1], s8[1], slots)
        ref.store_kv_int8(k, v, c8[2], s8[2], c8[3], s8[3], slots)
        # Codes may differ by one where x / scale rounds differently; compare dequantised values.
        deq = [ref.dequantize_int8(c, s) for c, s in zip(c8, s8)]
        err = max(max_err(deq[0], deq[2]), max_err(deq[1], deq[3]))
        tol = 1.01 * max(s8[2].max().item(), s8[3].max().item())
        record("store_kv_int8", f"N={n}", err, tol,
               ms(lambda: store_kv_int8(k, v, c8[0], s8[0], c8[1], s8[1], slots)),
               ms(lambda: ref.store_kv_int8(k, v, c8[2], s8[2], c8[3], s8[3], slots)))

        x = (torch.randn(n, HIDDEN, generator=g, device=dev) * 3).to(dtype)
        w = (torch.rand(HIDDEN, generator=g, device=dev) + 0.5).to(dtype)
        out = torch.empty_like(x)
        y_ref = ref.rms_norm(x, w, 1e-6)
        record("rms_norm", f"N={n} H={HIDDEN}", max_err(rms_norm(x, w, 1e-6), y_ref),
               elem_tol(dtype, y_ref), ms(lambda: rms_norm(x, w, 1e-6, out=out)), ms(lambda: ref.rms_norm(x, w, 1e-6)))

        delta = (torch.randn(n, HIDDEN, generator=g, device=dev) * 3).to(dtype)
        xa, xr = x.clone(), x.clone()
        y_ref = ref.add_rms_norm(xr, delta, w, 1e-6)
        y = add_rms_norm(xa, delta, w, 1e-6)
        # timed on fresh copies each call would time the copy too: repeated in-place adds are fine for timing
        record("add_rms_norm", f"N={n} H={HIDDEN}", max(max_err(y, y_ref), max_err(xa, xr)),
               elem_tol(dtype, y_ref), ms(lambda: add_rms_norm(xa, delta, w, 1e-6)),
               ms(lambda: ref.add_rms_norm(xr, delta, w, 1e-6)))

        gate_up = torch.randn(n, 2 * INTERMEDIATE, generator=g, device=dev).to(dtype)
        y_ref = ref.silu_mul(gate_up)
        record("silu_mul", f"N={n} I={INTERMEDIATE}", max_err(silu_mul(gate_up), y_ref), elem_tol(dtype, y_ref),
               ms(lambda: silu_mul(gate_up)), ms(lambda: ref.silu_mul(gate_up)))

        pos = torch.randint(0, 2000, (n,), generator=g, device=dev)
        inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32, device=dev) / D))
        ang = pos[:, None].float() * inv_freq
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        q = qkv[:, :HQ * D].view(n, HQ, D)
        expected = qkv.clone()
        ref.rotary(expected[:, :HQ * D].view(n, HQ, D), expected[:, HQ * D:(HQ + HKV) * D].view(n, HKV, D), cos, sin)
        work = qkv.clone()
        rotary(work[:, :HQ * D].view(n, HQ, D), work[:, HQ * D:(HQ + HKV) * D].view(n, HKV, D), cos, sin)
        # Timed on q/k views of qkv (rotating repeatedly is fine for timing).
        record("rotary", f"N={n}", max_err(work, expected), elem_tol(dtype, expected),
               ms(lambda: rotary(q, k, cos, sin)), ms(lambda: ref.rotary(q, k, cos, sin)))


def bench_context(dtype, dev, g, quick):
    print("context_attention (prefill)", flush=True)
    for int8 in (False, True):
        for bsz, prefix, new in ends(CONTEXT_CASES, quick):
            pool = Pool([prefix + new] * bsz, dtype, dev, g, int8=int8)
            news = torch.full((bsz,), new, dtype=torch.int32, device=dev)
            starts = torch.arange(bsz, dtype=torch.int32, device=dev) * new
            totals = news + prefix
            q = torch.randn(bsz * new, HQ, D, generator=g, device=dev).to(dtype)
            args = (pool.req_to_token, pool.b_req_idx, starts, news, totals, new, D ** -0.5)
            fn, rfn = ((context_attention_int8, ref.context_attention_int8) if int8 else
                       (context_attention, ref.context_attention))
            err = max_err(fn(q, *pool.caches, *args), rfn(q, *pool.caches, *args))
            record(fn.__name__, f"B={bsz} prefix={prefix} new={new}", err, ATTN_TOL[dtype],
                   ms(lambda: fn(q, *pool.caches, *args)), ms(lambda: rfn(q, *pool.caches, *args)))


def bench_decode(dtype, dev, g, quick, sweep):
    print("decode_attention (flash decoding)", flush=True)
    for int8 in (False, True):
        fn, rfn = (decode_attention_int8, ref.decode_attention_int8) if int8 else (decode_attention, ref.decode_attention)
        for bsz in ends(DECODE_BATCHES, quick):
            for seq in DECODE_SEQS:
                lengths = torch.randint(seq // 2, seq + 1, (bsz,), generator=g, device=dev)
                lengths[0] = seq
                pool = Pool(lengths.tolist(), dtype, dev, g, int8=int8)
                q = torch.randn(bsz, HQ, D, generator=g, device=dev).to(dtype)
                args = (pool.req_to_token, pool.b_req_idx, lengths.int(), seq, D ** -0.5)
                out = torch.empty_like(q)
                err = max_err(fn(q, *pool.caches, *args), rfn(q, *pool.caches, *args))
                bs = pick_block_seq(bsz, HKV, seq)
                record(fn.__name__, f"B={bsz} seq<={seq} block={bs}", err, ATTN_TOL[dtype],
                       ms(lambda: fn(q, *pool.caches, *args, out=out)), ms(lambda: rfn(q, *pool.caches, *args)))
                if sweep:
                    times = {b: ms(lambda: fn(q, *pool.caches, *args, out=out, block_seq=b)) for b in BLOCK_SEQS}
                    print("    block_seq sweep (us): " + ", ".join(f"{b}: {t * 1e3:.1f}" for b, t in times.items()),
                          flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--sweep", action="store_true", help="time decode attention at every block_seq")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (the CPU tests run the kernels under TRITON_INTERPRET=1)")
        return 2
    dev = torch.device("cuda")
    dtype = DTYPES[a.dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  {a.dtype}",
          flush=True)
    with torch.inference_mode():
        bench_elementwise(dtype, dev, g, a.quick)
        bench_context(dtype, dev, g, a.quick)
        bench_decode(dtype, dev, g, a.quick, a.sweep)
    print()
    print("| kernel | case | max abs err | tol | check | triton us | reference us | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nall {len(rows)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
