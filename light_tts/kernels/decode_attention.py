"""Decode attention (one new token per request) over the token-level pool: flash decoding.

Stage 1: one program per (request, kv head, block of BLOCK_SEQ positions) handles every q head of
that kv head's GQA group at once (the group is the M dim of tl.dot, padded to 16), so each K/V
block is read once per group; the online softmax is light_tts.kernels._online_softmax. It writes
the block's normalised partial output and its log-sum-exp (base 2) into a scratch buffer; blocks
at or past a request's length exit at once and are never read. Stage 2: one program per
(request, q head) merges that request's blocks.

`max_len` (>= every b_seq_len) sizes the grid only, so a CUDA graph captured for one max_len
serves every batch with shorter requests. `decode_attention_int8` is the same over an int8 pool
with per-slot-and-head scales (K scale on the q.k row, V scale on the probabilities).
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
BLOCK_SEQS = (32, 64, 128, 256)
TARGET_PROGRAMS = 256  # enough stage-1 programs to fill an H100's 132 SMs about twice


@triton.jit
def _decode_stage1_kernel(Q, KCache, VCache, KScale, VScale, ReqToToken, BReqIdx, BSeqLen, MidO, MidLse,
                          qk_scale, stride_qb, stride_qh, stride_cs, stride_ch, stride_ss, stride_sh, stride_rr,
                          stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
                          GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_SEQ: tl.constexpr,
                          BLOCK_N: tl.constexpr, KV_INT8: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    blk = tl.program_id(2)
    seq_len = tl.load(BSeqLen + b)
    blk_start = blk * BLOCK_SEQ
    if blk_start >= seq_len:
        return
    blk_end = tl.minimum(seq_len, blk_start + BLOCK_SEQ)
    req = tl.load(BReqIdx + b).to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    g_valid = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    # Padding rows of the group are zero queries: finite scores, never stored.
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_valid[:, None], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range(blk_start, blk_end, BLOCK_N):
        n = n0 + offs_n
        n_valid = n < blk_end
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, n, n_valid, n_valid[None, :], req, ReqToToken, KCache, VCache,
                                      KScale, VScale, kvh, qk_scale, stride_rr, stride_cs, stride_ch, stride_ss,
                                      stride_sh, D=D, KV_INT8=KV_INT8, DOT_PRECISION=DOT_PRECISION)
    tl.store(MidO + b * stride_mob + heads[:, None] * stride_moh + blk * stride_mos + offs_d[None, :],
             acc / l_i[:, None], mask=g_valid[:, None])
    tl.store(MidLse + b * stride_mlb + heads * stride_mlh + blk, m_i + tl.log2(l_i), mask=g_valid)


@triton.jit
def _decode_stage2_kernel(MidO, MidLse, BSeqLen, O, stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
                          stride_ob, stride_oh, D: tl.constexpr, BLOCK_SEQ: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(BSeqLen + b)
    offs_d = tl.arange(0, D)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([D], tl.float32)
    # Only the blocks stage 1 wrote: those that start before seq_len.
    for blk in range(0, tl.cdiv(seq_len, BLOCK_SEQ)):
        lse = tl.load(MidLse + b * stride_mlb + h * stride_mlh + blk)
        part = tl.load(MidO + b * stride_mob + h * stride_moh + blk * stride_mos + offs_d)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + part * w
        l = l * alpha + w
        m = m_new
    # seq_len 0 (an idle batch slot) gives zeros instead of 0/0.
    out = tl.where(l > 0, acc / l, 0.0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty))


def pick_block_seq(batch: int, num_kv_heads: int, max_len: int) -> int:
    """The largest block whose stage-1 grid still has TARGET_PROGRAMS programs (smallest otherwise):
    long blocks keep the scratch traffic low at large batch, short ones fill the GPU at batch 1."""
    for bs in reversed(BLOCK_SEQS):
        if batch * num_kv_heads * triton.cdiv(max_len, bs) >= TARGET_PROGRAMS:
            return bs
    return BLOCK_SEQS[0]


def _launch(q, k_cache, v_cache, k_scale, v_scale, req_to_token, b_req_idx, b_seq_len, max_len, sm_scale,
            out, block_seq, block_n, scratch, kv_int8):
    check_rank("q", q, 3)
    bsz, hq, d = q.shape
    check(q.dtype in FLOAT_DTYPES, f"q must be a float tensor, got {q.dtype}")
    check_last_contiguous("q", q)
    check_head_dim(d)
    check_req_to_token(req_to_token)
    check_index("b_req_idx", b_req_idx, bsz)
    check_index("b_seq_len", b_seq_len, bsz)
    max_len = int(max_len)
    check(max_len >= 1, f"max_len must be >= 1, got {max_len}")
    hkv = k_cache.shape[1] if k_cache.dim() == 3 else -1
    check_kv_cache("k_cache", k_cache, hkv, d)
    check_kv_cache("v_cache", v_cache, hkv, d)
    out = attention_out(q, hkv, out)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, req_to_token=req_to_token, b_req_idx=b_req_idx,
                      b_seq_len=b_seq_len, out=out)
    if bsz == 0:
        return out
    if block_seq is None:
        block_seq = pick_block_seq(bsz, hkv, max_len)
    if block_n is None:
        block_n = min(block_seq, 64)
    check(block_seq % block_n == 0, f"block_seq {block_seq} must be a multiple of block_n {block_n}")
    num_blocks = triton.cdiv(max_len, block_seq)
    if scratch is None:
        mid_o = torch.empty((bsz, hq, num_blocks, d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((bsz, hq, num_blocks), dtype=torch.float32, device=q.device)
    else:
        mid_o, mid_lse = scratch
        check(tuple(mid_o.shape) == (bsz, hq, num_blocks, d) and mid_o.dtype == torch.float32 and mid_o.is_contiguous(),
              f"scratch[0] must be contiguous fp32 {(bsz, hq, num_blocks, d)}")
        check(tuple(mid_lse.shape) == (bsz, hq, num_blocks) and mid_lse.dtype == torch.float32 and mid_lse.is_contiguous(),
              f"scratch[1] must be contiguous fp32 {(bsz, hq, num_blocks)}")
    group = hq // hkv
    _decode_stage1_kernel[(bsz, hkv, num_blocks)](
        q, k_cache, v_cache, k_scale, v_scale, req_to_token, b_req_idx, b_seq_len, mid_o, mid_lse,
        float(sm_scale) * LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_scale.stride(0), k_scale.stride(1), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=d, BLOCK_SEQ=block_seq, BLOCK_N=block_n,
        KV_INT8=kv_int8, DOT_PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=2)
    _decode_stage2_kernel[(bsz, hq)](
        mid_o, mid_lse, b_seq_len, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1), D=d, BLOCK_SEQ=block_seq,
        num_warps=1)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                     b_req_idx: torch.Tensor, b_seq_len: torch.Tensor, max_len: int, sm_scale: float, *,
                     out: Optional[torch.Tensor] = None, block_seq: Optional[int] = None,
                     block_n: Optional[int] = None,
                     scratch: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """q [B, Hq, D] (one new token per request; its K/V already stored at position seq_len - 1);
    k_cache, v_cache [slots + 1, Hkv, D] (q's dtype); b_seq_len [B] tokens per request, new one
    included (0 gives a zero row); max_len >= every b_seq_len. Returns o [B, Hq, D] (`out` if
    given). `scratch`: optional (mid_o fp32 [B, Hq, nblk, D], mid_lse fp32 [B, Hq, nblk]) with
    nblk = cdiv(max_len, block_seq)."""
    check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
          f"k_cache/v_cache must have q's dtype {q.dtype}, got {k_cache.dtype}/{v_cache.dtype}")
    return _launch(q, k_cache, v_cache, k_cache, v_cache, req_to_token, b_req_idx, b_seq_len, max_len, sm_scale,
                   out, block_seq, block_n, scratch, kv_int8=False)


def decode_attention_int8(q: torch.Tensor, k_cache_i8: torch.Tensor, k_scale: torch.Tensor, v_cache_i8: torch.Tensor,
                          v_scale: torch.Tensor, req_to_token: torch.Tensor, b_req_idx: torch.Tensor,
                          b_seq_len: torch.Tensor, max_len: int, sm_scale: float, *,
                          out: Optional[torch.Tensor] = None, block_seq: Optional[int] = None,
                          block_n: Optional[int] = None,
                          scratch: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """decode_attention over an int8 pool: codes [slots + 1, Hkv, D] int8 and scales [slots + 1, Hkv]."""
    check_scale("k_scale", k_scale, k_cache_i8)
    check_scale("v_scale", v_scale, v_cache_i8)
    check_same_device(q=q, k_scale=k_scale, v_scale=v_scale)
    return _launch(q, k_cache_i8, v_cache_i8, k_scale, v_scale, req_to_token, b_req_idx, b_seq_len, max_len,
                   sm_scale, out, block_seq, block_n, scratch, kv_int8=True)
