"""flow_attention: the flow estimator's self-attention for a padded batch of rows, with the
chunk mask as a rule instead of a dense (B, 1, T, T) bias, and an optional cached prefix per row
read from the prompt cache's pool (light_tts/server/decode/prompt_cache.py).

Row r holds n_r new frames (q, k, v [B, T, H, D]; frames past n_r are padding). Before them sit
the row's cached frames, in two runs of pool slots: its voice's prompt frames (prefix_len[r] at
prefix_start[r] ...) and then its own stream's earlier frames (stream_len[r] at stream_start[r]
...; none without stream_start). With P = prefix_len[r] + stream_len[r], new frame i is at
absolute position p = P + i. It sees every cached frame (a prefix ends on a chunk boundary) and
the new frames j < n_r with, for a streaming row, P + j < (p // CHUNK + 1) * CHUNK (the
chunk-causal mask of the official streaming decoder). Rows past branch_rows read branch 1 of the
pool (the unconditional half of the CFG batch). Padded query frames get zeros.

One program per (row, head, BLOCK_M query frames); online softmax in base 2, fp32 accumulation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from light_tts.kernels._checks import FLOAT_DTYPES, check, check_head_dim, check_index, check_same_device, dot_precision

LOG2E = 1.4426950408889634


@triton.jit
def _fold(q, k, v, visible, acc, m_i, l_i, qk_scale, DOT_PRECISION: tl.constexpr):
    """Fold keys k [D, N] and values v [N, D] into the online-softmax state of q [M, D]."""
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # rows that have seen no key yet keep m = -inf: exp2(-inf - -inf) would be NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fold_pool(q, KPool, VPool, base, count, sps, offs_n, offs_d, acc, m_i, l_i, qk_scale,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold `count` cached frames from pool slot offset `base` on (all visible)."""
    for j0 in range(0, count, BLOCK_N):
        j = j0 + offs_n
        j_valid = j < count
        k = tl.load(KPool + base + j[None, :].to(tl.int64) * sps + offs_d[:, None], mask=j_valid[None, :], other=0.0)
        v = tl.load(VPool + base + j[:, None].to(tl.int64) * sps + offs_d[None, :], mask=j_valid[:, None], other=0.0)
        acc, m_i, l_i = _fold(q, k, v, j_valid[None, :], acc, m_i, l_i, qk_scale, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _flow_attention_kernel(Q, K, V, O, Lengths, Streaming, PStart, PLen, SStart, SLen, KPool, VPool, qk_scale,
                           sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                           sps, spb, sph, branch_rows, T,
                           CHUNK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           HAS_STREAM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    n = tl.minimum(tl.load(Lengths + r), T)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    m_valid = offs_m < n
    o_ptrs = O + r * sob + offs_m[:, None] * sot + h * soh + offs_d[None, :]
    o_mask = (offs_m < T)[:, None]
    if m0 >= n:   # a block of padding frames: zeros
        tl.store(o_ptrs, tl.zeros([BLOCK_M, D], O.dtype.element_ty), mask=o_mask)
        return
    q = tl.load(Q + r * sqb + offs_m[:, None] * sqt + h * sqh + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    plen = tl.load(PLen + r)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # cached prefix (the voice's frames, then the stream's own): every frame visible
    branch = (r // branch_rows) * spb + h * sph
    if plen > 0:
        base = tl.load(PStart + r).to(tl.int64) * sps + branch
        acc, m_i, l_i = _fold_pool(q, KPool, VPool, base, plen, sps, offs_n, offs_d, acc, m_i, l_i, qk_scale,
                                   BLOCK_N, DOT_PRECISION)
    if HAS_STREAM:
        slen = tl.load(SLen + r)
        if slen > 0:
            base = tl.load(SStart + r).to(tl.int64) * sps + branch
            acc, m_i, l_i = _fold_pool(q, KPool, VPool, base, slen, sps, offs_n, offs_d, acc, m_i, l_i, qk_scale,
                                       BLOCK_N, DOT_PRECISION)
        plen = plen + slen

    # new frames: key limit per query row (streaming: the end of the query's chunk)
    limit = tl.zeros([BLOCK_M], tl.int32) + n
    end = n
    if tl.load(Streaming + r) != 0:
        pos = plen + offs_m
        limit = tl.minimum(limit, (pos // CHUNK + 1) * CHUNK - plen)
        last = plen + tl.minimum(m0 + BLOCK_M, n) - 1
        end = tl.minimum(n, (last // CHUNK + 1) * CHUNK - plen)
    for j0 in range(0, end, BLOCK_N):
        j = j0 + offs_n
        j_valid = j < end
        k = tl.load(K + r * skb + j[None, :] * skt + h * skh + offs_d[:, None], mask=j_valid[None, :], other=0.0)
        v = tl.load(V + r * svb + j[:, None] * svt + h * svh + offs_d[None, :], mask=j_valid[:, None], other=0.0)
        visible = j[None, :] < limit[:, None]
        acc, m_i, l_i = _fold(q, k, v, visible, acc, m_i, l_i, qk_scale, DOT_PRECISION)

    out = tl.where(m_valid[:, None], acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)


def check_flow_attention(q, k, v, lengths, streaming, prefix_start, prefix_len, k_pool, v_pool, branch_rows, out,
                         stream_start=None, stream_len=None):
    """Shapes and dtypes of flow_attention's arguments (metadata only: safe in a CUDA-graph capture)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(t.dim() == 4 and t.shape == q.shape, f"{name} must be [B, T, H, D] = {tuple(q.shape)}, "
                                                   f"got {tuple(t.shape)}")
        check(t.dtype == q.dtype and t.dtype in FLOAT_DTYPES, f"{name} must be a float tensor of q's dtype")
        check(t.stride(-1) == 1, f"{name} must be contiguous in its last dim")
    b, _, h, d = q.shape
    check_head_dim(d)
    check((stream_start is None) == (stream_len is None), "stream_start and stream_len go together")
    for name, t in (("lengths", lengths), ("streaming", streaming), ("prefix_start", prefix_start),
                    ("prefix_len", prefix_len), ("stream_start", stream_start), ("stream_len", stream_len)):
        if t is not None:
            check_index(name, t, b)
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        check(t.dim() == 4 and tuple(t.shape[2:]) == (h, d) and t.shape[1] in (1, 2),
              f"{name} must be [slots, branches (1 or 2), {h}, {d}], got {tuple(t.shape)}")
        check(t.dtype == q.dtype and t.stride(-1) == 1, f"{name} must be {q.dtype}, contiguous in its last dim")
    check(k_pool.stride() == v_pool.stride(), "k_pool and v_pool must have the same strides")
    check(branch_rows >= 1 and -(-b // branch_rows) <= k_pool.shape[1],
          f"branch_rows {branch_rows}: rows {b} need more branches than the pool's {k_pool.shape[1]}")
    check(out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, f"out must be {q.dtype} {tuple(q.shape)}")
    check_same_device(q=q, k=k, v=v, lengths=lengths, streaming=streaming, prefix_start=prefix_start,
                      prefix_len=prefix_len, k_pool=k_pool, v_pool=v_pool, out=out,
                      **({} if stream_start is None else {"stream_start": stream_start, "stream_len": stream_len}))


def flow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, streaming: torch.Tensor,
                   prefix_start: torch.Tensor, prefix_len: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   chunk_frames: int, sm_scale: float, *, branch_rows: int, out: Optional[torch.Tensor] = None,
                   stream_start: Optional[torch.Tensor] = None, stream_len: Optional[torch.Tensor] = None,
                   block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """q, k, v [B, T, H, D] (last dim contiguous); lengths, streaming, prefix_start, prefix_len and
    (optional, together) stream_start, stream_len [B] int32/int64; k_pool, v_pool [slots, branches,
    H, D] views (unused where every prefix is empty); row r reads branch r // branch_rows. Returns
    out [B, T, H, D] (zeros past each row's length)."""
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    check_flow_attention(q, k, v, lengths, streaming, prefix_start, prefix_len, k_pool, v_pool, branch_rows, out,
                         stream_start, stream_len)
    has_stream = stream_start is not None
    b, t, h, d = q.shape
    if b == 0 or t == 0:
        return out
    grid = (b, h, triton.cdiv(t, block_m))
    _flow_attention_kernel[grid](
        q, k, v, out, lengths, streaming, prefix_start, prefix_len, stream_start if has_stream else prefix_start,
        stream_len if has_stream else prefix_len, k_pool, v_pool, float(sm_scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(1), out.stride(2), k_pool.stride(0), k_pool.stride(1),
        k_pool.stride(2), int(branch_rows), t,
        CHUNK=int(chunk_frames) if chunk_frames > 0 else 1 << 30, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_STREAM=has_stream, DOT_PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=2)
    return out
