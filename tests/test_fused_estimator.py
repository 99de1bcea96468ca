"""The fused flow estimator (light_tts.server.decode.fused_estimator) and its frame_norm kernel.

- FusedEstimator equals the module-by-module BiasEstimator on the same weights and inputs (fp32, the
  plain-PyTorch frame_norm; the same mask given as a FrameAttention, not a dense bias): a padded batch with streaming and full-attention rows and an empty
  padding row. Every weight is re-drawn, biases and LayerNorm affine included, so a bias or norm
  taken from the wrong module changes the output.
- The Triton frame_norm (under TRITON_INTERPRET=1, see conftest.py) equals its reference for each
  combination of terms, for (B, T, C) and (B, C, T) layouts and in place; the whole fused estimator
  runs through the Triton kernel and matches too.
"""
import pytest
import torch

from light_tts.server.decode.batched_flow import BiasEstimator, FrameAttention, attention_bias
from light_tts.server.decode.fused_estimator import FusedEstimator
from light_tts.kernels import dispatch
from light_tts.kernels import reference as ref
from light_tts.models.flow.estimator import CausalConditionalDecoder
from light_tts.models.flow.masks import valid_mask


def _estimator(seed: int = 0) -> CausalConditionalDecoder:
    torch.manual_seed(seed)
    est = CausalConditionalDecoder(in_channels=320, out_channels=80, channels=(32,), attention_head_dim=16,
                                   n_blocks=2, num_mid_blocks=2, num_heads=2, static_chunk_size=6).eval()
    with torch.no_grad():
        for name, p in est.named_parameters():
            # LayerNorm weights around 1, everything else small and nonzero (the official init zeros biases)
            base = 1.0 if name.endswith("weight") and p.dim() == 1 else 0.0
            p.copy_(base + (0.2 if base else 1.0) * torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
    return est


def _inputs(est, lengths, streaming, frames: int):
    """(x, mask, mu, t, spks, cond), the dense bias (BiasEstimator) and the FrameAttention
    (FusedEstimator) of the same rows."""
    b = len(lengths)
    g = torch.Generator().manual_seed(1)
    mask = valid_mask(torch.tensor(lengths), frames)
    bias = attention_bias(mask, torch.tensor(streaming), est.static_chunk_size, torch.float32)
    mf = mask.float()
    zeros = torch.zeros(b, dtype=torch.int32)
    rows = FrameAttention(torch.tensor(lengths, dtype=torch.int32), torch.tensor(streaming, dtype=torch.int32),
                          zeros, zeros, zeros, zeros, branch_rows=b)
    return (torch.randn(b, 80, frames, generator=g) * mf, mf, torch.randn(b, 80, frames, generator=g) * mf,
            torch.rand(b, generator=g), torch.randn(b, 80, generator=g),
            torch.randn(b, 80, frames, generator=g) * mf), bias, rows




@pytest.fixture(scope="module")
def est():
    return _estimator()


@torch.inference_mode()
def test_fused_equals_module_forward(est):
    args, bias, rows = _inputs(est, [20, 15, 3, 0], [True, False, True, False], 20)
    with dispatch.using("reference"):
        want = BiasEstimator(est)(*args, bias)
        got = FusedEstimator(est)(*args, rows)
    assert got.shape == want.shape == (4, 80, 20)
    assert want[:3].abs().max() > 1e-2  # a live signal, not an all-zero comparison
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # padded frames and the padding row are zero, as the plain forward leaves them
    assert got[1, :, 15:].abs().max() == 0 and got[3].abs().max() == 0


@torch.inference_mode()
def test_fused_catches_a_wrong_norm(est):
    """The comparison above is sharp enough to see one LayerNorm's affine taken from a neighbour."""
    args, bias, rows = _inputs(est, [12, 12], [True, True], 12)
    with dispatch.using("reference"):
        want = BiasEstimator(est)(*args, bias)
        fused = FusedEstimator(est)
        blk = est.mid_blocks[0][1][1]
        saved = blk.norm3.weight.clone()
        blk.norm3.weight.copy_(blk.norm1.weight)
        try:
            got = fused(*args, rows)
        finally:
            blk.norm3.weight.copy_(saved)
    assert not torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def _btc(shape, layout: str, dtype, g):
    b, t, c = shape
    if layout == "btc":
        return torch.randn(b, t, c, generator=g).to(dtype)
    return torch.randn(b, c, t, generator=g).to(dtype).transpose(1, 2)  # a (B, C, T) tensor's view


CASES = {
    "norm": dict(norm=True),
    "norm+mish+mask+post, mask_end": dict(norm=True, mish=True, mask=True, post="bcast", mask_end=True),
    "norm+mish+mask+post": dict(norm=True, mish=True, mask=True, post="full"),
    "residual+bias+sum+norm": dict(delta=True, pre=True, sum=True, norm=True),
    "residual+bias+mask": dict(delta=True, pre=True, mask=True),
    "mish+mask_end": dict(mish=True, mask=True, mask_end=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["btc", "bct"])
@pytest.mark.parametrize("channels", [24, 256])
def test_frame_norm_triton_equals_reference(case, layout, dtype, channels):
    from light_tts.kernels.frame_norm import frame_norm as triton_frame_norm
    spec = CASES[case]
    g = torch.Generator().manual_seed(3)
    # T not a power of two: the masked tail of the last tile; C = 24 a masked channel tail, C = 256
    # (the estimator's) tiles of 16 frames, so 37 frames take three programs per row
    shape = (3, 37, channels)
    a = _btc(shape, layout, dtype, g) * 3 + 1
    kw = {}
    if spec.get("delta"):
        kw["delta"] = _btc(shape, "btc", dtype, g)
    if spec.get("pre"):
        kw["pre_bias"] = torch.randn(shape[2], generator=g).to(dtype)
    if spec.get("norm"):
        kw["weight"] = (1 + 0.3 * torch.randn(shape[2], generator=g)).to(dtype)
        kw["bias"] = (0.3 * torch.randn(shape[2], generator=g)).to(dtype)
        kw["eps"] = 1e-5
    if spec.get("mask"):
        kw["mask"] = valid_mask(torch.tensor([37, 20, 0]), 37)[:, 0, :].to(dtype)
        kw["mask_end"] = spec.get("mask_end", False)
    if spec.get("post") == "bcast":
        kw["post_add"] = torch.randn(shape[0], shape[2], generator=g).to(dtype).unsqueeze(1).expand(shape)
    elif spec.get("post") == "full":
        kw["post_add"] = _btc(shape, "bct", dtype, g)
    kw["mish"] = spec.get("mish", False)

    def run(fn):
        a_ = a.clone() if layout == "btc" else a.transpose(1, 2).clone().transpose(1, 2)
        out = _btc(shape, "bct" if layout == "btc" else "btc", dtype, g).zero_()  # the other layout
        extra = {"sum_out": a_} if spec.get("sum") else {}   # in place, as the estimator uses it
        fn(a_, out, **kw, **extra)
        return out, a_

    want, want_sum = run(ref.frame_norm)
    got, got_sum = run(triton_frame_norm)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(got_sum.float(), want_sum.float(), **tol)
    if spec.get("mask_end") or (spec.get("mask") and "post" not in spec):
        assert got[2].abs().max() == 0  # the all-padding row


def test_frame_norm_rejects_bad_arguments():
    from light_tts.kernels.frame_norm import frame_norm as triton_frame_norm
    a = torch.zeros(2, 5, 8)
    with pytest.raises(ValueError, match="out must be"):
        triton_frame_norm(a, torch.zeros(2, 8, 5))
    with pytest.raises(ValueError, match="weight and bias"):
        triton_frame_norm(a, torch.zeros_like(a), weight=torch.ones(8))
    with pytest.raises(ValueError, match="mask_end needs a mask"):
        triton_frame_norm(a, torch.zeros_like(a), mask_end=True)
    with pytest.raises(ValueError, match="mask must be a float"):
        triton_frame_norm(a, torch.zeros_like(a), mask=torch.ones(2, 5, dtype=torch.bool))


@torch.inference_mode()
def test_fused_estimator_through_triton(est):
    """The whole fused forward with the Triton frame_norm and flow_attention (interpreted) against
    the reference ones."""
    args, _, rows = _inputs(est, [14, 9], [True, False], 14)
    with dispatch.using("reference"):
        want = FusedEstimator(est)(*args, rows)
    with dispatch.using("triton"):
        got = FusedEstimator(est)(*args, rows)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_fused_in_bf16_is_as_accurate_as_the_module_forward(est):
    """bf16 (what the GPU runs): against the fp32 module forward, the fused path's error is of the
    same size as the bf16 module forward's own (one rounding per fused op, not per op)."""
    import copy
    args, bias, rows = _inputs(est, [20, 15], [True, False], 20)
    half = copy.deepcopy(est).to(torch.bfloat16)
    args16 = [a.to(torch.bfloat16) for a in args]
    with dispatch.using("reference"):
        want = BiasEstimator(est)(*args, bias)
        plain = BiasEstimator(half)(*args16, bias.to(torch.bfloat16)).float()
        fused = FusedEstimator(half)(*args16, rows).float()

    def rel(x):
        return float((x - want).norm() / want.norm())
    assert rel(plain) < 5e-2 and rel(fused) < 5e-2, (rel(plain), rel(fused))
    assert rel(fused) < 2 * rel(plain) + 1e-3, (rel(plain), rel(fused))
