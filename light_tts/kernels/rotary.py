"""RoPE in place on q and k, Qwen2's non-interleaved "rotate_half" layout (qwen2.apply_rope):
out[:D/2] = x1 cos - x2 sin, out[D/2:] = x2 cos + x1 sin, with x1, x2 the two halves of a head."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from light_tts.kernels._checks import FLOAT_DTYPES, check, check_last_contiguous, check_rank, check_same_device


@triton.jit
def _rotate_heads(X, stride_h, c, s, H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate heads [0, H) of one token (X points at its head 0) by cos c / sin s ([1, HALF], fp32)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    mask = offs_h[:, None] < H
    p1 = X + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=mask).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, Cos, Sin, stride_qn, stride_qh, stride_kn, stride_kh, stride_cn, stride_sn,
                   HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr):
    # One program per token: every q and k head of it.
    i = tl.program_id(0)
    offs_d = tl.arange(0, HALF)
    c = tl.load(Cos + i * stride_cn + offs_d).to(tl.float32)[None, :]
    s = tl.load(Sin + i * stride_sn + offs_d).to(tl.float32)[None, :]
    _rotate_heads(Q + i * stride_qn, stride_qh, c, s, HQ, HALF, BLOCK_HQ)
    _rotate_heads(K + i * stride_kn, stride_kh, c, s, HKV, HALF, BLOCK_HKV)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [N, Hq, D] and k [N, Hkv, D] in place (any token/head strides, e.g. views of a fused
    qkv projection; last dim contiguous). cos, sin: [N, D / 2], the first halves of the [N, D]
    tables of the tokens' positions. Computes in fp32, one rounding to q's / k's dtype."""
    check_rank("q", q, 3)
    check_rank("k", k, 3)
    n, hq, d = q.shape
    check(k.shape[0] == n and k.shape[2] == d, f"k must be [{n}, Hkv, {d}], got {tuple(k.shape)}")
    check(d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0, f"head_dim / 2 must be a power of two, got D={d}")
    for name, t in (("cos", cos), ("sin", sin)):
        check(tuple(t.shape) == (n, d // 2), f"{name} must be [{n}, {d // 2}], got {tuple(t.shape)}")
        check_last_contiguous(name, t)
        check(t.dtype in FLOAT_DTYPES, f"{name} must be a float tensor, got {t.dtype}")
    check_last_contiguous("q", q)
    check_last_contiguous("k", k)
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    if n == 0:
        return
    hkv = k.shape[1]
    _rotary_kernel[(n,)](q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         cos.stride(0), sin.stride(0), HQ=hq, HKV=hkv, HALF=d // 2,
                         BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HKV=triton.next_power_of_2(hkv),
                         num_warps=2)
