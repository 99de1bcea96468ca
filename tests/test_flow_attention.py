"""flow_attention (kernels/flow_attention.py): the Triton kernel against its reference under the
interpreter, and the reference against the estimator's dense-bias attention (batched_flow's
attention_bias over the whole sequence, prefix included: the voice's run of pool slots, then the
stream's own)."""
import pytest
import torch
import torch.nn.functional as F

from light_tts.kernels import reference
from light_tts.kernels.flow_attention import flow_attention as triton_flow_attention
from light_tts.server.decode.batched_flow import attention_bias
from light_tts.models.flow.masks import valid_mask

CHUNK = 8


def make_case(seed: int, d: int = 16, h: int = 2, dtype=torch.float32):
    """Two CFG branches x 3 rows: a streaming row with a prefix, a streaming row without, a full row.
    Then the stream runs: the first row's stream continues its voice prefix (8 frames elsewhere in
    the pool), the second has a stream prefix and no voice prefix."""
    g = torch.Generator().manual_seed(seed)
    rows, t = 6, 21
    q, k, v = (torch.randn(rows, t, h, d, generator=g, dtype=torch.float32).to(dtype) for _ in range(3))
    lengths = torch.tensor([21, 13, 9, 21, 13, 9], dtype=torch.int32)
    streaming = torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.int32)
    prefix_start = torch.tensor([3, 0, 0, 3, 0, 0], dtype=torch.int32)
    prefix_len = torch.tensor([16, 0, 0, 16, 0, 0], dtype=torch.int32)
    pool_k = torch.randn(40, 2, h, d, generator=g).to(dtype)
    pool_v = torch.randn(40, 2, h, d, generator=g).to(dtype)
    stream_start = torch.tensor([30, 20, 0, 30, 20, 0], dtype=torch.int32)
    stream_len = torch.tensor([8, 8, 0, 8, 8, 0], dtype=torch.int32)
    return q, k, v, lengths, streaming, prefix_start, prefix_len, pool_k, pool_v, stream_start, stream_len


def runs(r, pstart, plen, sstart, slen):
    """Row r's cached runs of pool slots (start, frames), voice first."""
    return [(int(pstart[r]), int(plen[r]))] + ([] if sstart is None else [(int(sstart[r]), int(slen[r]))])


@pytest.mark.parametrize("with_stream", [False, True])
def test_reference_matches_dense_bias_over_the_whole_sequence(with_stream):
    q, k, v, lengths, streaming, pstart, plen, pk, pv, sstart, slen = make_case(0)
    if not with_stream:
        sstart = slen = None
    got = reference.flow_attention(q, k, v, lengths, streaming, pstart, plen, pk, pv, CHUNK, 0.25, branch_rows=3,
                                   stream_start=sstart, stream_len=slen)
    for r in range(q.size(0)):
        n, br = int(lengths[r]), r // 3
        cached = runs(r, pstart, plen, sstart, slen)
        p = sum(m for _, m in cached)
        kk = torch.cat([pk[s:s + m, br] for s, m in cached] + [k[r, :n]])[None].transpose(1, 2)
        vv = torch.cat([pv[s:s + m, br] for s, m in cached] + [v[r, :n]])[None].transpose(1, 2)
        qq = torch.cat([torch.zeros(p, *q.shape[2:]), q[r, :n]])[None].transpose(1, 2)
        bias = attention_bias(valid_mask(torch.tensor([p + n]), p + n), streaming[r:r + 1].bool(), CHUNK,
                              torch.float32)
        want = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias, scale=0.25).transpose(1, 2)[0, p:]
        torch.testing.assert_close(got[r, :n], want, atol=1e-5, rtol=1e-5)
        assert got[r, n:].abs().max() == 0 if n < q.size(1) else True


# fp16, not bf16: the interpreter has no bf16 dot
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("block,with_stream", [((16, 16), False), ((64, 64), False), ((16, 16), True)])
def test_kernel_matches_reference(dtype, tol, block, with_stream):
    q, k, v, lengths, streaming, pstart, plen, pk, pv, sstart, slen = make_case(1, dtype=dtype)
    if not with_stream:
        sstart = slen = None
    # q/k/v as the estimator hands them over: views of one (B, T, 3, H, D) projection
    qkv = torch.stack([q, k, v], dim=2)
    q, k, v = qkv.unbind(2)
    kw = dict(branch_rows=3, stream_start=sstart, stream_len=slen)
    want = reference.flow_attention(q, k, v, lengths, streaming, pstart, plen, pk, pv, CHUNK, 0.25, **kw)
    got = triton_flow_attention(q, k, v, lengths, streaming, pstart, plen, pk, pv, CHUNK, 0.25, **kw,
                                block_m=block[0], block_n=block[1])
    if with_stream:   # the stream's frames count: without them the output moves
        assert (got.float() - triton_flow_attention(q, k, v, lengths, streaming, pstart, plen, pk, pv, CHUNK, 0.25,
                                                    branch_rows=3, block_m=16, block_n=16).float()).abs().max() > 0.05
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert got[2, 9:].abs().max() == 0   # padding frames are zeros


def test_kernel_rejects_a_pool_of_the_wrong_shape():
    q, k, v, lengths, streaming, pstart, plen, pk, pv, _, _ = make_case(2)
    with pytest.raises(ValueError, match="k_pool"):
        triton_flow_attention(q, k, v, lengths, streaming, pstart, plen, pk[:, :, :1], pv, CHUNK, 0.25, branch_rows=3)
