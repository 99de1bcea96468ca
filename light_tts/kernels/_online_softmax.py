"""One key block of flash attention's online softmax over the token-level pool, shared by the
prefill (context_attention) and decode (decode_attention) kernels.

The state of M query rows is (acc [M, D] unnormalised output, m_i [M] running max, l_i [M] running
sum of exp2(score - m_i)); scores are in base 2 (the softmax scale times log2(e) is folded into
qk_scale), accumulation is fp32. After the last block the output is acc / l_i. Every row must see
at least one key over all blocks, or l_i stays 0.

No function here may carry a kernel's name: light_tts.kernels.dispatch looks kernels up by name in
every module of this package.
"""
import triton
import triton.language as tl


@triton.jit
def _attend_block(q, acc, m_i, l_i, n, n_valid, visible, req, ReqToToken, KCache, VCache, KScale, VScale, kvh,
                  qk_scale, stride_rr, stride_cs, stride_ch, stride_ss, stride_sh,
                  D: tl.constexpr, KV_INT8: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold keys at positions n [BLOCK_N] of request row `req` (kv head kvh) into the state of
    q [M, D]. n_valid [BLOCK_N]: positions that exist (loads are masked by it); visible
    (broadcastable to [M, BLOCK_N]): which scores count, n_valid included. Int8 pool: the K scale
    multiplies the q.k row, the V scale the probabilities. Returns (acc, m_i, l_i)."""
    offs_d = tl.arange(0, D)
    slots = tl.load(ReqToToken + req * stride_rr + n, mask=n_valid, other=0).to(tl.int64)
    k = tl.load(KCache + slots[None, :] * stride_cs + kvh * stride_ch + offs_d[:, None],
                mask=n_valid[None, :], other=0.0)                     # [D, BLOCK_N]
    if KV_INT8:
        qk = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)
        ks = tl.load(KScale + slots * stride_ss + kvh * stride_sh, mask=n_valid, other=0.0).to(tl.float32)
        qk = qk * (ks * qk_scale)[None, :]
    else:
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(VCache + slots[:, None] * stride_cs + kvh * stride_ch + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)                     # [BLOCK_N, D]
    if KV_INT8:
        vs = tl.load(VScale + slots * stride_ss + kvh * stride_sh, mask=n_valid, other=0.0).to(tl.float32)
        pv = tl.dot((p * vs[None, :]).to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i
