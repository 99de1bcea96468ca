"""Int8 KV pool for --mode triton_int8kv: quantise new tokens' K/V into their slots.

Symmetric, per token and head: scale = absmax over D / 127 (fp32, stored in the scale tensor's
dtype), code = round-half-even(x / scale) clamped to [-127, 127]; an all-zero vector gets scale 0
and codes 0 (reference.quantize_int8). Attention over the int8 pool lives beside the fp kernels
(context_attention_int8, decode_attention_int8) and is re-exported here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from light_tts.kernels._checks import (FLOAT_DTYPES, check, check_kv_cache, check_last_contiguous, check_rank,
                                       check_same_device, check_scale)
from light_tts.kernels.context_attention import context_attention_int8  # noqa: F401  (re-export)
from light_tts.kernels.decode_attention import decode_attention_int8  # noqa: F401  (re-export)


@triton.jit
def _round_half_even(y):
    # libdevice.rint is not available under TRITON_INTERPRET, so build it from floor: |y| <= 127
    # here, where y + 0.5 and r - y are exact except just below .5, which the `d > 0.5` case fixes.
    r = tl.floor(y + 0.5)
    d = r - y
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r - 1.0, r)


@triton.jit
def _quantize_token(X, stride_xh, Codes, stride_ch, Scale, stride_sh, H: tl.constexpr, D: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    """Quantise heads [0, H) of one token (X at its head 0) into Codes / Scale (at its slot)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    mask = offs_h[:, None] < H
    x = tl.load(X + offs_h[:, None] * stride_xh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full([BLOCK_H], 127.0, tl.float32))
    y = tl.math.div_rn(x, tl.maximum(scale, 1e-30)[:, None])
    codes = tl.minimum(tl.maximum(_round_half_even(y), -127.0), 127.0)
    tl.store(Codes + offs_h[:, None] * stride_ch + offs_d[None, :], codes.to(tl.int8), mask=mask)
    tl.store(Scale + offs_h * stride_sh, scale.to(Scale.dtype.element_ty), mask=offs_h < H)


@triton.jit
def _store_kv_int8_kernel(K, V, KCodes, KScale, VCodes, VScale, Slots,
                          stride_kn, stride_kh, stride_vn, stride_vh, stride_cs, stride_ch, stride_ss, stride_sh,
                          H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    # One program per token.
    i = tl.program_id(0)
    slot = tl.load(Slots + i).to(tl.int64)
    _quantize_token(K + i * stride_kn, stride_kh, KCodes + slot * stride_cs, stride_ch,
                    KScale + slot * stride_ss, stride_sh, H, D, BLOCK_H)
    _quantize_token(V + i * stride_vn, stride_vh, VCodes + slot * stride_cs, stride_ch,
                    VScale + slot * stride_ss, stride_sh, H, D, BLOCK_H)


def store_kv_int8(k: torch.Tensor, v: torch.Tensor, k_cache_i8: torch.Tensor, k_scale: torch.Tensor,
                  v_cache_i8: torch.Tensor, v_scale: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantise k, v [N, Hkv, D] (any token/head strides, last dim contiguous) and write codes into
    k_cache_i8 / v_cache_i8 [slots + 1, Hkv, D] and scales into k_scale / v_scale [slots + 1, Hkv]
    at `slots` (int64 [N], distinct), in place."""
    check_rank("k", k, 3)
    n, hkv, d = k.shape
    check(v.shape == k.shape, f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    check(k.dtype in FLOAT_DTYPES and v.dtype in FLOAT_DTYPES, f"k, v must be float tensors, got {k.dtype}/{v.dtype}")
    check_last_contiguous("k", k)
    check_last_contiguous("v", v)
    check(d & (d - 1) == 0, f"head_dim must be a power of two, got {d}")
    check_kv_cache("k_cache_i8", k_cache_i8, hkv, d)
    check_kv_cache("v_cache_i8", v_cache_i8, hkv, d)
    check_scale("k_scale", k_scale, k_cache_i8)
    check_scale("v_scale", v_scale, v_cache_i8)
    check(v_scale.stride() == k_scale.stride(), "k_scale and v_scale must have the same strides")
    check(slots.dim() == 1 and slots.shape[0] == n and slots.dtype in (torch.int32, torch.int64),
          f"slots must be int64 [{n}], got {slots.dtype} {tuple(slots.shape)}")
    check(slots.is_contiguous(), "slots must be contiguous")
    check_same_device(k=k, v=v, k_cache_i8=k_cache_i8, v_cache_i8=v_cache_i8, k_scale=k_scale, v_scale=v_scale,
                      slots=slots)
    if n == 0:
        return
    _store_kv_int8_kernel[(n,)](k, v, k_cache_i8, k_scale, v_cache_i8, v_scale, slots,
                                k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                k_cache_i8.stride(0), k_cache_i8.stride(1), k_scale.stride(0), k_scale.stride(1),
                                H=hkv, D=d, BLOCK_H=triton.next_power_of_2(hkv), num_warps=1)
