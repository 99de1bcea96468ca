"""Fused RMSNorm over the last dim, qwen2.RMSNorm's numerics: normalise in fp32, cast to x's
dtype, then multiply by the weight (the product rounded once to the output dtype).

add_rms_norm also applies the pending residual first (x += delta in place, rounded once to x's
dtype, as `x = x + delta`), so a decoder layer's two residual adds cost no kernel of their own."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from light_tts.kernels._checks import FLOAT_DTYPES, check, check_last_contiguous, check_rank, check_same_device


@triton.jit
def _normalize_row(x, X, W, Y_row, offs, mask, H, eps):
    """Write weight * norm(x) of one row (x: fp32 values of X's dtype) at Y_row."""
    mean_sq = tl.sum(x * x, axis=0) / H
    # Correctly rounded sqrt and division (the defaults are approximate on GPUs).
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean_sq + eps))
    xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    # An fp16/bf16 x fp16/bf16 product is exact in fp32, so this rounds like the reference's
    # multiply in the narrow dtype.
    tl.store(Y_row + offs, (xn * w).to(Y_row.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_xn, stride_yn, H, eps, BLOCK_H: tl.constexpr):
    # One program per row.
    i = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(X + i * stride_xn + offs, mask=mask, other=0.0).to(tl.float32)
    _normalize_row(x, X, W, Y + i * stride_yn, offs, mask, H, eps)


@triton.jit
def _add_rms_norm_kernel(X, D, W, Y, stride_xn, stride_dn, stride_yn, H, eps, BLOCK_H: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(X + i * stride_xn + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(D + i * stride_dn + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + d).to(X.dtype.element_ty)
    tl.store(X + i * stride_xn + offs, s, mask=mask)
    _normalize_row(s.to(tl.float32), X, W, Y + i * stride_yn, offs, mask, H, eps)


def _prepare(x: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """Checks shared by both norms; returns the output tensor."""
    check_rank("x", x, 2)
    n, h = x.shape
    check(x.dtype in FLOAT_DTYPES, f"x must be a float tensor, got {x.dtype}")
    check(tuple(weight.shape) == (h,) and weight.is_contiguous(), f"weight must be contiguous [{h}], got {tuple(weight.shape)}")
    check_last_contiguous("x", x)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty((n, h), dtype=out_dtype, device=x.device)
    check(tuple(out.shape) == (n, h) and out.dtype == out_dtype, f"out must be {out_dtype} [{n}, {h}]")
    check_last_contiguous("out", out)
    check_same_device(x=x, weight=weight, out=out)
    return out


def _launch_args(h: int) -> dict:
    block = triton.next_power_of_2(h)
    return dict(BLOCK_H=block, num_warps=min(8, max(1, block // 256)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [N, H] (rows may be strided, last dim contiguous), weight [H] -> y [N, H] in the dtype
    `weight * x` has in torch (x's dtype when they match, as in the engine). `out`: optional
    preallocated result."""
    out = _prepare(x, weight, out)
    n, h = x.shape
    if n:
        _rms_norm_kernel[(n,)](x, weight, out, x.stride(0), out.stride(0), h, float(eps), **_launch_args(h))
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (x, delta [N, H], same dtype, last dim contiguous), then rms_norm(x)."""
    out = _prepare(x, weight, None)
    n, h = x.shape
    check(tuple(delta.shape) == (n, h) and delta.dtype == x.dtype,
          f"delta must be {x.dtype} [{n}, {h}], got {delta.dtype} {tuple(delta.shape)}")
    check_last_contiguous("delta", delta)
    check_same_device(x=x, delta=delta)
    if n:
        _add_rms_norm_kernel[(n,)](x, delta, weight, out, x.stride(0), delta.stride(0), out.stride(0), h, float(eps),
                                   **_launch_args(h))
    return out
