"""Tests of the CosyVoice2 flow (light_tts.models.flow) at the tiny sizes.

Equivalence with the official code is checked outside the repo (/work/refcheck/flow_check.py);
here: key names/shapes, the fixed noise, shapes per mode, determinism, the streaming
(chunk-causal) property, batching, plain-formula checks of the pieces, and fp16/bf16.
"""
import math

import pytest
import torch

from light_tts.models.flow import build_flow, cfm as cfm_mod
from light_tts.models.flow.conformer import rel_shift
from light_tts.models.flow.masks import attention_mask, make_pad_mask

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    flow=dict(input_size=64, output_size=80, spk_embed_dim=192, output_type="mel", vocab_size=6561,
              input_frame_rate=25, only_mask_loss=True, token_mel_ratio=2, pre_lookahead_len=3),
    encoder=dict(output_size=64, attention_heads=2, linear_units=128, num_blocks=2, dropout_rate=0.1,
                 positional_dropout_rate=0.1, attention_dropout_rate=0.1, normalize_before=True,
                 input_layer="linear", pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn",
                 input_size=64, use_cnn_module=False, macaron_style=False, static_chunk_size=25),
    cfm=dict(in_channels=240, n_spks=1, spk_emb_dim=80, sigma_min="1e-06", solver="euler", t_scheduler="cosine",
             training_cfg_rate=0.2, inference_cfg_rate=0.7, reg_loss_type="l1"),
    estimator=dict(in_channels=320, out_channels=80, channels=[64], dropout=0.0, attention_head_dim=32,
                   n_blocks=1, num_mid_blocks=1, num_heads=2, act_fn="gelu", static_chunk_size=50,
                   num_decoding_left_chunks=-1),
)


def _build():
    torch.manual_seed(0)
    m = build_flow(TINY["flow"], TINY["encoder"], TINY["cfm"], TINY["estimator"]).eval()
    with torch.no_grad():  # non-zero biases so masking mistakes show up
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def flow():
    return _build()


def _inputs(n_prompt=10, n_new=30, seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    prompt_token = torch.randint(0, 6561, (batch, n_prompt), generator=g)
    token = torch.randint(0, 6561, (batch, n_new), generator=g)
    prompt_feat = torch.randn(batch, 2 * n_prompt, 80, generator=g)
    emb = torch.randn(batch, 192, generator=g)
    ln = lambda n: torch.full((batch,), n, dtype=torch.int32)  # noqa: E731
    return token, ln(n_new), prompt_token, ln(n_prompt), prompt_feat, ln(2 * n_prompt), emb


# ---------------------------------------------------------------- state dict

def _expected_keys():
    """The official flow.pt key layout for the tiny sizes: (name, shape) in state_dict order."""
    D, F, H, dk, C, T4 = 64, 128, 2, 32, 64, 256  # encoder width/ffn/heads/head dim; estimator ch; time dim
    keys = [("input_embedding.weight", (6561, D)), ("spk_embed_affine_layer.weight", (80, 192)),
            ("spk_embed_affine_layer.bias", (80,))]

    def linear(p, o, i, bias=True):
        return [(p + ".weight", (o, i))] + ([(p + ".bias", (o,))] if bias else [])

    def norm(p, n):
        return [(p + ".weight", (n,)), (p + ".bias", (n,))]

    def conformer(p):
        a = p + ".self_attn"
        return ([(a + ".pos_bias_u", (H, dk)), (a + ".pos_bias_v", (H, dk))]
                + linear(a + ".linear_q", D, D) + linear(a + ".linear_k", D, D) + linear(a + ".linear_v", D, D)
                + linear(a + ".linear_out", D, D) + linear(a + ".linear_pos", D, D, bias=False)
                + linear(p + ".feed_forward.w_1", F, D) + linear(p + ".feed_forward.w_2", D, F)
                + norm(p + ".norm_ff", D) + norm(p + ".norm_mha", D))

    keys += linear("encoder.embed.out.0", D, D) + norm("encoder.embed.out.1", D) + norm("encoder.after_norm", D)
    keys += [("encoder.pre_lookahead_layer.conv1.weight", (D, D, 4)), ("encoder.pre_lookahead_layer.conv1.bias", (D,)),
             ("encoder.pre_lookahead_layer.conv2.weight", (D, D, 3)), ("encoder.pre_lookahead_layer.conv2.bias", (D,))]
    for i in range(2):
        keys += conformer(f"encoder.encoders.{i}")
    keys += [("encoder.up_layer.conv.weight", (D, D, 5)), ("encoder.up_layer.conv.bias", (D,))]
    keys += linear("encoder.up_embed.out.0", D, D) + norm("encoder.up_embed.out.1", D)
    for i in range(4):
        keys += conformer(f"encoder.up_encoders.{i}")
    keys += linear("encoder_proj", 80, D)

    e = "decoder.estimator"

    def conv(p, o, i, k):
        return [(p + ".weight", (o, i, k)), (p + ".bias", (o,))]

    def resnet(p, i, o):
        return (linear(p + ".mlp.1", o, T4) + conv(p + ".block1.block.0", o, i, 3) + norm(p + ".block1.block.2", o)
                + conv(p + ".block2.block.0", o, o, 3) + norm(p + ".block2.block.2", o) + conv(p + ".res_conv", o, i, 1))

    def transformer(p):
        return (norm(p + ".norm1", C) + linear(p + ".attn1.to_q", C, C, False) + linear(p + ".attn1.to_k", C, C, False)
                + linear(p + ".attn1.to_v", C, C, False) + linear(p + ".attn1.to_out.0", C, C) + norm(p + ".norm3", C)
                + linear(p + ".ff.net.0.proj", 4 * C, C) + linear(p + ".ff.net.2", C, 4 * C))

    keys += linear(e + ".time_mlp.linear_1", T4, 320) + linear(e + ".time_mlp.linear_2", T4, T4)
    keys += resnet(e + ".down_blocks.0.0", 320, C) + transformer(e + ".down_blocks.0.1.0") + conv(e + ".down_blocks.0.2", C, C, 3)
    keys += resnet(e + ".mid_blocks.0.0", C, C) + transformer(e + ".mid_blocks.0.1.0")
    keys += resnet(e + ".up_blocks.0.0", 2 * C, C) + transformer(e + ".up_blocks.0.1.0") + conv(e + ".up_blocks.0.2", C, C, 3)
    keys += conv(e + ".final_block.block.0", C, C, 3) + norm(e + ".final_block.block.2", C) + conv(e + ".final_proj", 80, C, 1)
    return keys


def test_state_dict_keys_match_official_layout(flow):
    got = [(k, tuple(v.shape)) for k, v in flow.state_dict().items()]
    assert got == _expected_keys()
    assert list(flow.named_buffers()) == []  # the official flow has no buffers either


# ---------------------------------------------------------------- noise

def test_fixed_noise_is_official_and_leaves_global_rng(monkeypatch):
    monkeypatch.setattr(cfm_mod, "_NOISE", None)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    noise = cfm_mod.fixed_noise()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    ref = torch.randn([1, 80, 15000])
    assert noise.shape == (1, 80, 15000) and noise.device.type == "cpu" and noise.dtype == torch.float32
    assert torch.equal(noise[:, :, :500], ref[:, :, :500])
    assert torch.equal(noise, ref)


# ---------------------------------------------------------------- pieces vs plain formulas

def test_rel_shift_formula():
    b, h, t = 2, 3, 7
    x = torch.randn(b, h, t, 2 * t - 1)
    want = torch.empty(b, h, t, t)
    for i in range(t):
        for j in range(t):
            want[:, :, i, j] = x[:, :, i, t - 1 - i + j]  # relative position i - j
    assert torch.equal(rel_shift(x), want)


def test_masks():
    assert make_pad_mask(torch.tensor([3, 1]), 4).tolist() == [[False, False, False, True], [False, True, True, True]]
    m = attention_mask(torch.ones(1, 1, 5, dtype=torch.bool), 2)[0].int().tolist()
    assert m == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # a query that would see nothing is opened (official behaviour)
    assert attention_mask(torch.zeros(1, 1, 3, dtype=torch.bool), 0).all()


class _LinearField(torch.nn.Module):
    """v(x) = a*x + b*mu + c*t + spk + cond: lets us write the expected Euler/CFG result by hand."""

    def forward(self, x, mask, mu, t, spks, cond, streaming=False):
        return (0.5 * x + 0.25 * mu + 0.1 * t.view(-1, 1, 1) + spks.unsqueeze(-1) + 0.3 * cond) * mask


def test_cfm_euler_cfg_plain_formula():
    cfm = cfm_mod.CausalConditionalCFM(estimator=_LinearField(), inference_cfg_rate=0.7)
    g = torch.Generator().manual_seed(3)
    T = 12
    mu, cond, spks = torch.randn(1, 80, T, generator=g), torch.randn(1, 80, T, generator=g), torch.randn(1, 80, generator=g)
    mask = torch.ones(1, 1, T)
    got, _ = cfm(mu, mask, 10, spks=spks, cond=cond)
    x = cfm_mod.fixed_noise()[:, :, :T].clone().double()
    ts = [1 - math.cos(k / 10 * math.pi / 2) for k in range(11)]
    for k in range(10):
        v_c = 0.5 * x + 0.25 * mu + 0.1 * ts[k] + spks.unsqueeze(-1) + 0.3 * cond
        v_u = 0.5 * x + 0.1 * ts[k]
        x = x + (ts[k + 1] - ts[k]) * (1.7 * v_c - 0.7 * v_u)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), x, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- inference

@pytest.mark.parametrize("streaming,finalize,frames", [(False, True, 60), (True, False, 54), (True, True, 60)])
def test_inference_shapes_and_determinism(flow, streaming, finalize, frames):
    args = _inputs(10, 30)
    mel, cache = flow.inference(*args, streaming=streaming, finalize=finalize)
    assert cache is None
    assert mel.shape == (1, 80, frames) and mel.dtype == torch.float32 and torch.isfinite(mel).all()
    mel2, _ = flow.inference(*args, streaming=streaming, finalize=finalize)
    assert torch.equal(mel, mel2)


def test_streaming_first_chunk_unchanged_by_later_tokens(flow):
    # prompt 10 + 15 new tokens fill token chunk 0 (25 tokens = 50 mel frames); +3 look-ahead
    short = _inputs(10, 18, seed=5)
    more = torch.randint(0, 6561, (1, 27), generator=torch.Generator().manual_seed(6))
    long_ = (torch.cat([short[0], more], 1), short[1] + 27) + short[2:]
    a, _ = flow.inference(*short, streaming=True, finalize=False)
    b, _ = flow.inference(*long_, streaming=True, finalize=False)
    assert a.shape[2] == 30
    torch.testing.assert_close(a, b[:, :, :30], atol=1e-4, rtol=1e-4)
    # without chunk masks the later tokens do leak into the first frames (the test can fail)
    c, _ = flow.inference(*short, streaming=False, finalize=False)
    d, _ = flow.inference(*long_, streaming=False, finalize=False)
    assert (c - d[:, :, :30]).abs().max() > 1e-3


def test_encoder_and_estimator_chunk_causal(flow):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 60, 64, generator=g)
    with torch.inference_mode():
        a, _ = flow.encoder(x[:, :28], torch.tensor([28]), streaming=True)   # chunk 0 + its 3-token look-ahead
        b, _ = flow.encoder(x, torch.tensor([60]), streaming=True)
        torch.testing.assert_close(a[:, :50], b[:, :50], atol=1e-5, rtol=1e-5)
        est = flow.decoder.estimator
        T = 130
        ins = [torch.randn(2, 80, T, generator=g), torch.ones(2, 1, T), torch.randn(2, 80, T, generator=g),
               torch.rand(2, generator=g), torch.randn(2, 80, generator=g), torch.randn(2, 80, T, generator=g)]
        cut = [v[..., :50] if v.dim() == 3 else v for v in ins]
        full = est(*ins, streaming=True)
        part = est(*cut, streaming=True)
        torch.testing.assert_close(part, full[..., :50], atol=1e-5, rtol=1e-5)
        assert (est(*cut, streaming=False) - est(*ins, streaming=False)[..., :50]).abs().max() > 1e-3


def test_batch_rows_match_single(flow):
    args = _inputs(10, 30, seed=11, batch=2)
    for streaming, finalize in ((False, True), (True, False)):
        both, _ = flow.inference(*args, streaming=streaming, finalize=finalize)
        for r in range(2):
            one, _ = flow.inference(*[a[r:r + 1] for a in args], streaming=streaming, finalize=finalize)
            torch.testing.assert_close(both[r:r + 1], one, atol=1e-4, rtol=1e-4)


def test_padded_batch_estimator_matches_single(flow):
    g = torch.Generator().manual_seed(13)
    est = flow.decoder.estimator
    T, short = 70, 44
    x, mu, cond = (torch.randn(2, 80, T, generator=g) for _ in range(3))
    t, spks = torch.rand(2, generator=g), torch.randn(2, 80, generator=g)
    mask = (~make_pad_mask(torch.tensor([T, short]), T)).unsqueeze(1).float()
    with torch.inference_mode():
        for streaming in (False, True):
            both = est(x, mask, mu, t, spks, cond, streaming=streaming)
            one = est(x[1:, :, :short], mask[1:, :, :short], mu[1:, :, :short], t[1:], spks[1:],
                      cond[1:, :, :short], streaming=streaming)
            torch.testing.assert_close(both[1:, :, :short], one, atol=1e-4, rtol=1e-4)
            assert both[1:, :, short:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_finite(dtype):
    m = _build().to(dtype)
    ref = _build()
    args = _inputs(10, 20)
    for streaming, finalize in ((False, True), (True, False)):
        mel, _ = m.inference(*args, streaming=streaming, finalize=finalize)
        want, _ = ref.inference(*args, streaming=streaming, finalize=finalize)
        assert mel.dtype == torch.float32 and torch.isfinite(mel).all()
        assert mel.shape == want.shape
        # loose: same model in lower precision stays close to fp32
        assert (mel - want).abs().mean() < 0.1 * want.abs().mean()


def test_positional_table_rebuild_keeps_the_old_table_alive():
    """CUDA graphs of the encoder hold the address of the cast table they were captured with: a
    longer eager call that rebuilds the table must not free it."""
    from light_tts.models.flow.conformer import RelPositionalEncoding
    pe = RelPositionalEncoding(8, max_len=16)
    old = pe.table(10, torch.device("cpu"), torch.float16)
    new = pe.table(40, torch.device("cpu"), torch.float16)
    assert new.size(1) >= 2 * 40 - 1 and new is not old
    assert any(t is old for t in pe._retired)
    torch.testing.assert_close(new[:, new.size(1) // 2], old[:, old.size(1) // 2])   # relative 0 row
