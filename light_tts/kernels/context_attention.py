"""Prefill attention over packed variable-length requests, reading K/V from the token-level pool.

q holds the new tokens of all requests back to back. New token i of request b sits at absolute
position p = total - new + i and attends causally to positions 0..p of its request, whose slots
come from req_to_token; so a cached prefix (history already in the pool) needs nothing extra.
The caller stores the new tokens' K/V before calling. GQA: q head h reads kv head h // (Hq / Hkv).

One program per (request, q head, block of BLOCK_M new tokens), online softmax over key blocks
(light_tts.kernels._online_softmax: exp2 with the scale folded in), fp32 accumulation.
`context_attention_int8` runs the same kernel on an int8 pool with per-slot-and-head scales: the K
scale multiplies the q.k row, the V scale the probabilities, so the int8 codes enter tl.dot
unchanged (they are exact in fp16/bf16).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from light_tts.kernels._checks import (FLOAT_DTYPES, attention_out, check, check_head_dim, check_index, check_kv_cache,
                                       check_last_contiguous, check_rank, check_req_to_token,
                                       check_same_device, check_scale, dot_precision)
from light_tts.kernels._online_softmax import _attend_block

LOG2E = 1.4426950408889634


@triton.jit
def _context_attention_kernel(Q, KCache, VCache, KScale, VScale, ReqToToken, BReqIdx, BStart, BNewLen,
                              BTotalLen, O, qk_scale,
                              stride_qn, stride_qh, stride_on, stride_oh, stride_cs, stride_ch,
                              stride_ss, stride_sh, stride_rr,
                              GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, KV_INT8: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    start_m = tl.program_id(2) * BLOCK_M
    new_len = tl.load(BNewLen + b)
    if start_m >= new_len:
        return
    total = tl.load(BTotalLen + b)
    q_start = tl.load(BStart + b)
    req = tl.load(BReqIdx + b).to(tl.int64)
    prefix = total - new_len
    kvh = h // GROUP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_valid = offs_m < new_len
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)
    # Rows past new_len get positions >= total: they see every key, so no row is all -inf (no NaN);
    # they are never stored.
    pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Keys this block of queries can see: positions 0 .. prefix + start_m + BLOCK_M - 1.
    end = tl.minimum(total, prefix + start_m + BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        n = n0 + offs_n
        n_valid = n < end
        visible = (n[None, :] <= pos[:, None]) & n_valid[None, :]
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, n, n_valid, visible, req, ReqToToken, KCache, VCache, KScale,
                                      VScale, kvh, qk_scale, stride_rr, stride_cs, stride_ch, stride_ss, stride_sh,
                                      D=D, KV_INT8=KV_INT8, DOT_PRECISION=DOT_PRECISION)
    acc = acc / l_i[:, None]
    tl.store(O + (q_start + offs_m)[:, None] * stride_on + h * stride_oh + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=m_valid[:, None])


def _check_batch(q, req_to_token, b_req_idx, b_start, b_new_len, b_total_len, max_new_len):
    check_rank("q", q, 3)
    check(q.dtype in FLOAT_DTYPES, f"q must be a float tensor, got {q.dtype}")
    check_last_contiguous("q", q)
    check_head_dim(q.shape[2])
    check_req_to_token(req_to_token)
    bsz = b_req_idx.shape[0] if b_req_idx.dim() == 1 else -1
    for name, t in (("b_req_idx", b_req_idx), ("b_start", b_start), ("b_new_len", b_new_len),
                    ("b_total_len", b_total_len)):
        check_index(name, t, bsz)
    check(int(max_new_len) >= 0, f"max_new_len must be >= 0, got {max_new_len}")
    return bsz


def _launch(q, k_cache, v_cache, k_scale, v_scale, req_to_token, b_req_idx, b_start, b_new_len, b_total_len,
            max_new_len, sm_scale, out, block_m, block_n, kv_int8):
    n_tok, hq, d = q.shape
    hkv = k_cache.shape[1]
    out = attention_out(q, hkv, out)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, req_to_token=req_to_token, b_req_idx=b_req_idx,
                      b_start=b_start, b_new_len=b_new_len, b_total_len=b_total_len, out=out)
    bsz = b_req_idx.shape[0]
    if bsz == 0 or max_new_len == 0:
        return out
    if block_m is None:
        block_m = 64 if d <= 64 else 32
    if block_n is None:
        block_n = 64 if d <= 64 else 32
    grid = (bsz, hq, triton.cdiv(int(max_new_len), block_m))
    _context_attention_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale, req_to_token, b_req_idx, b_start, b_new_len, b_total_len, out,
        float(sm_scale) * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_scale.stride(0), k_scale.stride(1), req_to_token.stride(0),
        GROUP=hq // hkv, D=d, BLOCK_M=block_m, BLOCK_N=block_n, KV_INT8=kv_int8,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=2)
    return out


def context_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                      b_req_idx: torch.Tensor, b_start: torch.Tensor, b_new_len: torch.Tensor,
                      b_total_len: torch.Tensor, max_new_len: int, sm_scale: float, *,
                      out: Optional[torch.Tensor] = None, block_m: Optional[int] = None,
                      block_n: Optional[int] = None) -> torch.Tensor:
    """q [N, Hq, D] packed new tokens (token/head strides free, last dim contiguous); k_cache, v_cache
    [slots + 1, Hkv, D] (q's dtype); req_to_token [R, L]; b_* [B] int32/int64 (b_start: q row of the
    request's first new token; b_new_len; b_total_len = prefix + new). max_new_len >= every
    b_new_len (it sizes the grid). Returns o [N, Hq, D] (`out` if given); rows of q that belong to
    no request are not written."""
    _check_batch(q, req_to_token, b_req_idx, b_start, b_new_len, b_total_len, max_new_len)
    d = q.shape[2]
    check_kv_cache("k_cache", k_cache, k_cache.shape[1] if k_cache.dim() == 3 else -1, d)
    check_kv_cache("v_cache", v_cache, k_cache.shape[1], d)
    check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
          f"k_cache/v_cache must have q's dtype {q.dtype}, got {k_cache.dtype}/{v_cache.dtype}")
    return _launch(q, k_cache, v_cache, k_cache, v_cache, req_to_token, b_req_idx, b_start, b_new_len,
                   b_total_len, max_new_len, sm_scale, out, block_m, block_n, kv_int8=False)


def context_attention_int8(q: torch.Tensor, k_cache_i8: torch.Tensor, k_scale: torch.Tensor,
                           v_cache_i8: torch.Tensor, v_scale: torch.Tensor, req_to_token: torch.Tensor,
                           b_req_idx: torch.Tensor, b_start: torch.Tensor, b_new_len: torch.Tensor,
                           b_total_len: torch.Tensor, max_new_len: int, sm_scale: float, *,
                           out: Optional[torch.Tensor] = None, block_m: Optional[int] = None,
                           block_n: Optional[int] = None) -> torch.Tensor:
    """context_attention over an int8 pool: codes [slots + 1, Hkv, D] int8 and scales [slots + 1, Hkv]
    (value = code * scale)."""
    _check_batch(q, req_to_token, b_req_idx, b_start, b_new_len, b_total_len, max_new_len)
    d = q.shape[2]
    check_kv_cache("k_cache_i8", k_cache_i8, k_cache_i8.shape[1] if k_cache_i8.dim() == 3 else -1, d)
    check_kv_cache("v_cache_i8", v_cache_i8, k_cache_i8.shape[1], d)
    check_scale("k_scale", k_scale, k_cache_i8)
    check_scale("v_scale", v_scale, v_cache_i8)
    check_same_device(q=q, k_scale=k_scale, v_scale=v_scale)
    return _launch(q, k_cache_i8, v_cache_i8, k_scale, v_scale, req_to_token, b_req_idx, b_start, b_new_len,
                   b_total_len, max_new_len, sm_scale, out, block_m, block_n, kv_int8=True)

