"""flow_attention (kernels/flow_attention.py): the Triton kernel against its reference under the
interpreter, and the reference against the estimator's dense-bias attention (batched_flow's
attention_bias over the whole sequence, prefix included)."""
import pytest
import torch
import torch.nn.functional as F

from light_tts.kernels import reference
from light_tts.kernels.flow_attention import flow_attention as triton_flow_attention
from light_tts.server.decode.batched_flow import attention_bias
from light_tts.models.flow.masks import valid_mask

CHUNK = 8


def make_case(seed: int, d: int = 16, h: int = 2, dtype=torch.float32):
    """Two CFG branches x 3 rows: a streaming row with a prefix, a streaming row without, a full row."""
    g = torch.Generator().manual_seed(seed)
    rows, t = 6, 21
    q, k, v = (torch.randn(rows, t, h, d, generator=g, dtype=torch.float32).to(dtype) for _ in range(3))
    lengths = torch.tensor([21, 13, 9, 21, 13, 9], dtype=torch.int32)
    streaming = torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.int32)
    prefix_start = torch.tensor([3, 0, 0, 3, 0, 0], dtype=torch.int32)
    prefix_len = torch.tensor([16, 0, 0, 16, 0, 0], dtype=torch.int32)
    pool_k = torch.randn(40, 2, h, d, generator=g).to(dtype)
    pool_v = torch.randn(40, 2, h, d, generator=g).to(dtype)
    return q, k, v, lengths, streaming, prefix_start, prefix_len, pool_k, pool_v


def test_reference_matches_dense_bias_over_the_whole_sequence():
    q, k, v, lengths, streaming, pstart, plen, pk, pv = make_case(0)
    got = reference.flow_attention(q, k, v, lengths, streaming, pstart, plen, pk, pv, CHUNK, 0.25, branch_rows=3)
    for r in range(q.size(0)):
        n, p, s, br = int(lengths[r]), int(plen[r]), int(pstart[r]), r // 3
        kk = torch.cat([pk[s:s + p, br], k[r, :n]])[None].transpose(1, 2)
        vv = torch.cat([pv[s:s + p, br], v[r, :n]])[None].transpose(1, 2)
        qq = torch.cat([torch.zeros(p, *q.shape[2:]), q[r, :n]])[None].transpose(1, 2)
        bias = attention_bias(valid_mask(torch.tensor([p + n]), p + n), streaming[r:r + 1].bool(), CHUNK,
                              torch.float32)
        want = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=bias, scale=0.25).transpose(1, 2)[0, p:]
        torch.testing.assert_close(got[r, :n], want, atol=1e-5, rtol=1e-5)
        assert got[r, n:].abs().max() == 0 if n < q.size(1) else True


# fp16, not bf16: the interpreter has no bf16 dot
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("block", [(16, 16), (64, 64)])
def test_kernel_matches_reference(dtype, tol, block):
    q, k, v, lengths, streaming, pstart, plen, pk, pv = make_case(1, dtype=dtype)
    # q/k/v as the estimator hands them over: views of one (B, T, 3, H, D) projection
    qkv = torch.stack([q, k, v], dim=2)
    q, k, v = qkv.unbind(2)
    want = reference.flow_attention(q, k, v, lengths, streaming, pstart, plen, pk, pv, CHUNK, 0.25, branch_rows=3)
    got = triton_flow_attention(q, k, v, lengths, streaming, pstart, plen, pk, pv, CHUNK, 0.25, branch_rows=3,
                                block_m=block[0], block_n=block[1])
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert got[2, 9:].abs().max() == 0   # padding frames are zeros


def test_kernel_rejects_a_pool_of_the_wrong_shape():
    q, k, v, lengths, streaming, pstart, plen, pk, pv = make_case(2)
    with pytest.raises(ValueError, match="k_pool"):
        triton_flow_attention(q, k, v, lengths, streaming, pstart, plen, pk[:, :, :1], pv, CHUNK, 0.25, branch_rows=3)
