"""Write the K/V of new tokens into their slots of one layer's token-level KV pool."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from light_tts.kernels._checks import check, check_kv_cache, check_last_contiguous, check_rank, check_same_device


@triton.jit
def _store_kv_kernel(K, V, KCache, VCache, Slots,
                     stride_kn, stride_kh, stride_vn, stride_vh, stride_cs, stride_ch,
                     H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    # One program per token: all of its heads at once.
    i = tl.program_id(0)
    slot = tl.load(Slots + i).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    mask = offs_h[:, None] < H
    k = tl.load(K + i * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + i * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(KCache + dst, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(VCache + dst, v.to(VCache.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v: [N, Hkv, D] (any token/head strides, last dim contiguous) -> k_cache[slots], v_cache[slots]
    ([num_slots + 1, Hkv, D], contiguous), in place. slots: int64 (or int32) [N], distinct."""
    check_rank("k", k, 3)
    n, hkv, d = k.shape
    check(v.shape == k.shape, f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    check_last_contiguous("k", k)
    check_last_contiguous("v", v)
    check(d & (d - 1) == 0, f"head_dim must be a power of two, got {d}")
    check_kv_cache("k_cache", k_cache, hkv, d)
    check(v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(),
          f"v_cache must match k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    check(slots.dim() == 1 and slots.shape[0] == n and slots.dtype in (torch.int32, torch.int64),
          f"slots must be int64 [{n}], got {slots.dtype} {tuple(slots.shape)}")
    check(slots.is_contiguous(), "slots must be contiguous")
    check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slots=slots)
    if n == 0:
        return
    _store_kv_kernel[(n,)](k, v, k_cache, v_cache, slots,
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(0), k_cache.stride(1),
                           H=hkv, D=d, BLOCK_H=triton.next_power_of_2(hkv), num_warps=1)
