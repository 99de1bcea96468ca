"""Tests of the CosyVoice3 flow (light_tts.models.flow.flow_dit, .dit) at tiny sizes, plus the full-size
parameter count.

Equivalence with the official code (bit-exact in fp32 on CPU at tiny and full size) is checked by
scripts/bench/check_cv3_flow.py; here: key names/shapes, the streaming (chunk-causal) property,
padding, output shapes per mode, the rotary convention, and a reduced-precision smoke run.
"""
import pytest
import torch

from light_tts.models.flow.dit import RotaryEmbedding, apply_rotary
from light_tts.models.flow.flow_dit import build_dit_flow
from model_util import key_shapes, official_keys

CHUNK_FRAMES = 20  # tiny static_chunk_size: 10 tokens at token_mel_ratio 2

FLOW = dict(input_size=80, output_size=80, spk_embed_dim=192, output_type="mel", vocab_size=6561,
            input_frame_rate=25, only_mask_loss=True, token_mel_ratio=2, pre_lookahead_len=3)
CFM = dict(in_channels=240, n_spks=1, spk_emb_dim=80, sigma_min="1e-06", solver="euler", t_scheduler="cosine",
           training_cfg_rate=0.2, inference_cfg_rate=0.7, reg_loss_type="l1")
TINY = dict(flow=FLOW, pre=dict(in_channels=80, channels=64, pre_lookahead_len=3), cfm=CFM,
            estimator=dict(dim=64, depth=2, heads=2, dim_head=32, ff_mult=2, mel_dim=80, mu_dim=80, spk_dim=80,
                           out_channels=80, static_chunk_size=CHUNK_FRAMES, num_decoding_left_chunks=-1))
# the official cosyvoice3.yaml (Fun-CosyVoice3-0.5B-2512)
FULL = dict(flow=FLOW, pre=dict(in_channels=80, channels=1024, pre_lookahead_len=3), cfm=CFM,
            estimator=dict(dim=1024, depth=22, heads=16, dim_head=64, ff_mult=2, mel_dim=80, mu_dim=80, spk_dim=80,
                           out_channels=80, static_chunk_size="50", num_decoding_left_chunks=-1))

# The official CausalMaskedDiffWithDiT built from cosyvoice3.yaml (official code, once):
# 332,257,088 parameters (331,142,224 in the DiT), 330 state-dict entries (incl. rotary_embed.inv_freq).
OFFICIAL_FULL_PARAMS = 332_257_088
OFFICIAL_FULL_DIT_PARAMS = 331_142_224
OFFICIAL_FULL_KEYS = 330


def _build(cfg=TINY):
    return build_dit_flow(cfg["flow"], cfg["pre"], cfg["cfm"], cfg["estimator"])


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    return _build().eval()


def _inputs(n_prompt=10, n_new=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_token=torch.randint(0, 6561, (1, n_prompt), generator=g),
                token=torch.randint(0, 6561, (1, n_new), generator=g),
                prompt_feat=torch.randn(1, 2 * n_prompt, 80, generator=g),
                embedding=torch.randn(1, 192, generator=g))


def _run(flow, inp, n_tokens=None, streaming=True, finalize=True, token=None):
    token = (inp["token"] if token is None else token)[:, :n_tokens]
    ln = lambda t: torch.tensor([t.shape[1]], dtype=torch.int32)  # noqa: E731
    mel, extra = flow.inference(token=token, token_len=ln(token), prompt_token=inp["prompt_token"],
                                prompt_token_len=ln(inp["prompt_token"]), prompt_feat=inp["prompt_feat"],
                                prompt_feat_len=ln(inp["prompt_feat"]), embedding=inp["embedding"],
                                streaming=streaming, finalize=finalize)
    assert extra is None and mel.dtype == torch.float32
    return mel


def _same(a, b):
    return torch.allclose(a, b, rtol=0, atol=1e-5)


def test_state_dict_matches_the_official_layout(flow):
    # the official CausalMaskedDiffWithDiT at the TINY sizes above, state_dict() order: recorded once with
    # the official code (cosyvoice ace7c47, x-transformers 2.31.10 / 2.11.24 alike) by
    # `scripts/bench/check_cv3_flow.py --tiny --print-keys`
    assert key_shapes(flow.state_dict()) == official_keys("cv3_flow_tiny")
    flow.load_state_dict(flow.state_dict(), strict=True)


def test_full_size_parameter_count_matches_the_official():
    with torch.device("meta"):
        full = _build(FULL)
    assert sum(p.numel() for p in full.parameters()) == OFFICIAL_FULL_PARAMS
    assert sum(p.numel() for p in full.decoder.estimator.parameters()) == OFFICIAL_FULL_DIT_PARAMS
    assert len(full.state_dict()) == OFFICIAL_FULL_KEYS
    assert full.decoder.estimator.static_chunk_size == 50 and full.decoder.sigma_min == 1e-6


def test_attributes_token2wav_uses(flow):
    assert (flow.pre_lookahead_len, flow.token_mel_ratio, flow.output_size) == (3, 2, 80)
    assert flow.spk_embed_affine_layer.in_features == 192 and flow.dtype == torch.float32
    assert flow.decoder.estimator.static_chunk_size == CHUNK_FRAMES


def test_output_shapes_per_mode(flow):
    inp = _inputs(n_new=13)
    assert _run(flow, inp, streaming=False, finalize=True).shape == (1, 80, 26)
    assert _run(flow, inp, streaming=True, finalize=True).shape == (1, 80, 26)
    # not finalised: the last pre_lookahead_len tokens are only look-ahead and yield no frames
    assert _run(flow, inp, streaming=True, finalize=False).shape == (1, 80, 20)
    assert _run(flow, inp, streaming=False, finalize=False).shape == (1, 80, 20)


def test_streaming_chunks_never_change(flow):
    """Prompt = one chunk; each call adds one chunk (10 tokens + 3 look-ahead): earlier chunks stay."""
    inp = _inputs()
    first = _run(flow, inp, 10 + 3, finalize=False)
    second = _run(flow, inp, 20 + 3, finalize=False)
    final = _run(flow, inp, 40, finalize=True)
    assert first.shape[2] == 20 and second.shape[2] == 40 and final.shape[2] == 80
    assert _same(second[:, :, :20], first)
    assert _same(final[:, :, :40], second)


def test_streaming_later_tokens_do_not_reach_earlier_chunks(flow):
    inp = _inputs()
    other = inp["token"].clone()
    other[:, 13:] = (other[:, 13:] + 1000) % 6561  # everything after chunk 1 and its look-ahead
    a = _run(flow, inp, 40, streaming=True)
    b = _run(flow, inp, 40, streaming=True, token=other)
    assert _same(a[:, :, :20], b[:, :, :20])
    assert not _same(a[:, :, 20:], b[:, :, 20:])
    # the look-ahead does reach back: changing token 10 (the first look-ahead token) changes chunk 1
    near = inp["token"].clone()
    near[:, 10] = (near[:, 10] + 1000) % 6561
    assert not _same(_run(flow, inp, 40, token=near)[:, :, :20], a[:, :, :20])
    # full attention (non-streaming) lets later tokens reach every frame
    a = _run(flow, inp, 40, streaming=False)
    b = _run(flow, inp, 40, streaming=False, token=other)
    assert not _same(a[:, :, :20], b[:, :, :20])


def test_streaming_per_row_matches_bool(flow):
    est = flow.decoder.estimator
    g = torch.Generator().manual_seed(3)
    x, mu, cond = (torch.randn(2, 80, 45, generator=g) for _ in range(3))
    mask, t, spks = torch.ones(2, 1, 45), torch.tensor([0.3, 0.3]), torch.randn(2, 80, generator=g)
    with torch.no_grad():
        rows = est(x, mask, mu, t, spks, cond, streaming=torch.tensor([True, False]))
        on = est(x, mask, mu, t, spks, cond, streaming=True)
        off = est(x, mask, mu, t, spks, cond, streaming=False)
    assert _same(rows[0], on[0]) and _same(rows[1], off[1]) and not _same(on[1], off[1])


@pytest.mark.parametrize("streaming", [False, True])
def test_padding_does_not_reach_real_frames(flow, streaming):
    est = flow.decoder.estimator
    g = torch.Generator().manual_seed(2)
    n, pad = 33, 12
    x, mu, cond = (torch.randn(1, 80, n + pad, generator=g) for _ in range(3))
    t, spks = torch.tensor([0.4]), torch.randn(1, 80, generator=g)
    mask = torch.ones(1, 1, n + pad)
    mask[:, :, n:] = 0
    with torch.no_grad():
        padded = est(x, mask, mu, t, spks, cond, streaming=streaming)
        alone = est(x[..., :n], mask[..., :n], mu[..., :n], t, spks, cond[..., :n], streaming=streaming)
    assert _same(padded[..., :n], alone)


def test_rotary_rotates_interleaved_pairs_of_the_first_head_only():
    """x_transformers' convention as the official attention uses it: pairs (2i, 2i+1) turn by
    pos * 10000^(-2i/d), applied to q/k before the head split with rotary width dim_head."""
    cos, sin = RotaryEmbedding(4)(5)  # dim_head 4; q of 2 heads = 8 channels
    x = torch.randn(1, 5, 8)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])  # head 1 untouched
    for pos in range(5):
        for i in range(2):
            angle = torch.tensor(pos / 10000 ** (2 * i / 4))
            a, b = x[0, pos, 2 * i], x[0, pos, 2 * i + 1]
            want = torch.stack([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()])
            assert torch.allclose(y[0, pos, 2 * i:2 * i + 2], want, atol=1e-6)


def test_bfloat16_runs_close_to_fp32(flow):
    inp = _inputs(n_new=20)
    ref = _run(flow, inp, streaming=True)
    low = _build().eval()
    low.load_state_dict(flow.state_dict())
    low = low.to(torch.bfloat16)
    inp_low = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inp.items()}
    got = _run(low, inp_low, streaming=True)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
