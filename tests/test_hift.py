"""HiFT vocoder (light_tts.models.hift): shapes, RNG, streaming cache, keys, dtypes.

Equivalence with the official HiFTGenerator is checked separately in the reference
venv (/work/refcheck/hift_check.py); these tests only use our code.
"""
import math

import pytest
import torch

from light_tts.models.hift import (ConvRNNF0Predictor, HiFTGenerator, Snake, build_hift,
                                   normalize_hift_state_dict)
from model_util import TINY_F0_KW, TINY_HIFT_KW, legacy_hift_state_dict, random_mel, speech_like_hift

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: thread start-up dominates

T = 10  # mel frames -> 4800 samples


def make_model(seed: int = 0) -> HiFTGenerator:
    torch.manual_seed(seed)
    return speech_like_hift(build_hift(TINY_HIFT_KW, TINY_F0_KW).eval(), f0_bias=150.0)  # mostly voiced


def make_mel(batch: int = 1, frames: int = T, seed: int = 1) -> torch.Tensor:
    return random_mel(frames, batch, seed)


def run(model, mel, seed=7, cache=None):
    return model.inference(mel, cache_source=cache, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return make_model()


def test_shapes(model):
    for batch, frames in ((1, T), (2, 3)):
        speech, source = run(model, make_mel(batch, frames))
        assert speech.shape == (batch, frames * 480)
        assert source.shape == (batch, 1, frames * 480)
        assert speech.dtype == torch.float32 and source.dtype == torch.float32
        assert torch.isfinite(speech).all()
        assert speech.abs().max() <= 0.99 + 1e-7          # audio_limit clamp
        assert speech.abs().max() > 0                      # not silent


def test_f0_voiced(model):
    f0 = model.f0_predictor(make_mel())
    assert f0.shape == (1, T)
    assert (f0 > 10).float().mean() > 0.5


def test_seed_determinism(model):
    mel = make_mel()
    a, sa = run(model, mel, seed=3)
    b, sb = run(model, mel, seed=3)
    c, sc = run(model, mel, seed=4)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert (a - c).abs().max() > 1e-5 and (sa - sc).abs().max() > 1e-5
    # The generator draws the same stream as the global RNG (the official path).
    torch.manual_seed(3)
    d, sd = model.inference(mel)
    assert torch.equal(a, d) and torch.equal(sa, sd)


def test_generator_stream_continues_across_calls(model):
    # Two calls on one generator == two calls after one global seed (RNG consumption matches).
    mel = make_mel()
    g = torch.Generator().manual_seed(5)
    model.inference(mel, generator=g)
    a, _ = model.inference(mel, generator=g)
    torch.manual_seed(5)
    model.inference(mel)
    b, _ = model.inference(mel)
    assert torch.equal(a, b)


def test_cache_source(model):
    mel = make_mel(frames=12)
    _, src_first = run(model, mel[:, :, :8], seed=1)
    cache = src_first[:, :, -3 * 480:]
    speech, src = run(model, mel[:, :, 5:], seed=2, cache=cache)
    assert torch.equal(src[:, :, :cache.shape[-1]], cache)
    _, src_nocache = run(model, mel[:, :, 5:], seed=2)
    assert torch.equal(src[:, :, cache.shape[-1]:], src_nocache[:, :, cache.shape[-1]:])
    assert not torch.equal(src, src_nocache)
    # An empty cache (the official default torch.zeros(1, 1, 0)) means "no cache".
    e, se = run(model, mel[:, :, 5:], seed=2, cache=torch.zeros(1, 1, 0))
    f, sf = run(model, mel[:, :, 5:], seed=2)
    assert torch.equal(e, f) and torch.equal(se, sf)


def test_source_matches_sine_formula():
    """Constant F0 and no voiced noise: the excitation is a plain sum of harmonics.

    The phase is accumulated per frame and linearly interpolated, so sample j
    (away from the first and last half hop, where the interpolation clamps) has
    phase 2*pi*k*f0*(j + 240.5)/sr for harmonic k.
    """
    class ConstF0(torch.nn.Module):
        def forward(self, mel):
            return torch.full((mel.shape[0], mel.shape[2]), 100.0)

    torch.manual_seed(0)
    kw = dict(TINY_HIFT_KW, nsf_sigma=0.0)
    model = HiFTGenerator(ConstF0(), **kw).eval()
    _, source = model.inference(make_mel(frames=6), generator=torch.Generator().manual_seed(0))
    j = torch.arange(240, 6 * 480 - 240, dtype=torch.float64)
    k = torch.arange(1, 10, dtype=torch.float64)
    sines = 0.1 * torch.sin(2 * math.pi * k[:, None] * 100.0 * (j[None] + 240.5) / 24000)   # [9, n]
    w = model.m_source.l_linear.weight.double()[0]
    b = model.m_source.l_linear.bias.double()[0]
    expected = torch.tanh(w @ sines + b)
    assert torch.allclose(source[0, 0, 240:-240].double(), expected, atol=2e-5)


def test_snake_formula():
    act = Snake(4)
    with torch.no_grad():
        act.alpha.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    x = torch.randn(2, 4, 5)
    a = act.alpha[None, :, None]
    assert torch.allclose(act(x), x + torch.sin(a * x) ** 2 / a, atol=1e-6)


def _expected_tiny_keys():
    """Official HiFTGenerator state-dict keys for the tiny config, spelled out by hand."""
    wn = lambda p: [f"{p}.bias", f"{p}.parametrizations.weight.original0", f"{p}.parametrizations.weight.original1"]

    def resblock(p):
        keys = []
        for i in range(3):
            keys += wn(f"{p}.convs1.{i}") + wn(f"{p}.convs2.{i}")
        keys += [f"{p}.activations1.{i}.alpha" for i in range(3)] + [f"{p}.activations2.{i}.alpha" for i in range(3)]
        return keys

    keys = ["m_source.l_linear.weight", "m_source.l_linear.bias"] + wn("conv_pre")
    for i in range(3):
        keys += wn(f"ups.{i}")
    for i in range(3):
        keys += [f"source_downs.{i}.weight", f"source_downs.{i}.bias"]
    for i in range(3):
        keys += resblock(f"source_resblocks.{i}")
    for i in range(9):
        keys += resblock(f"resblocks.{i}")
    keys += wn("conv_post")
    for i in (0, 2, 4, 6, 8):
        keys += wn(f"f0_predictor.condnet.{i}")
    keys += ["f0_predictor.classifier.weight", "f0_predictor.classifier.bias"]
    return keys


def test_state_dict_keys_tiny(model):
    sd = model.state_dict()
    assert sorted(sd) == sorted(_expected_tiny_keys())
    assert len(sd) == 328  # count of the official module built with the tiny kwargs
    shapes = {
        "conv_pre.parametrizations.weight.original0": (32, 1, 1),
        "conv_pre.parametrizations.weight.original1": (32, 80, 7),
        "ups.0.parametrizations.weight.original0": (32, 1, 1),   # ConvTranspose: dim 0 = in channels
        "ups.0.parametrizations.weight.original1": (32, 16, 16),
        "ups.2.parametrizations.weight.original1": (8, 4, 7),
        "source_downs.0.weight": (16, 18, 30),
        "source_downs.1.weight": (8, 18, 6),
        "source_downs.2.weight": (4, 18, 1),
        "source_resblocks.2.convs1.0.parametrizations.weight.original1": (4, 4, 11),
        "resblocks.8.convs2.2.parametrizations.weight.original1": (4, 4, 11),
        "resblocks.0.activations1.0.alpha": (16,),
        "conv_post.parametrizations.weight.original1": (18, 4, 7),
        "m_source.l_linear.weight": (1, 9),
        "f0_predictor.condnet.0.parametrizations.weight.original1": (32, 80, 3),
        "f0_predictor.classifier.weight": (1, 32),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k


def test_normalize_legacy_state_dict(model):
    legacy = legacy_hift_state_dict(model.state_dict())
    assert any(k.endswith(".weight_g") for k in legacy)
    fresh = make_model(seed=99)
    fresh.load_state_dict(normalize_hift_state_dict(legacy), strict=True)
    mel = make_mel()
    a, _ = run(model, mel)
    b, _ = run(fresh, mel)
    assert torch.equal(a, b)
    # Already-normalised dicts pass through unchanged.
    sd = model.state_dict()
    assert normalize_hift_state_dict(sd).keys() == sd.keys()


def test_fold_weight_norm():
    model = make_model()
    mel = make_mel()
    a, sa = run(model, mel)
    model.fold_weight_norm()
    assert not any("parametrizations" in k for k in model.state_dict())
    b, sb = run(model, mel)
    assert torch.equal(sa, sb)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model = make_model()
    mel = make_mel(frames=4)  # half-precision convs are slow on CPU
    ref, _ = run(model, mel)
    model.to(dtype)
    out, src = run(model, mel.to(dtype))
    assert out.dtype == torch.float32 and src.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(src).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # measured ~1% (fp16), ~2% (bf16)


def test_build_hift_coerces_strings():
    kw = dict(TINY_HIFT_KW, nsf_alpha="0.1", nsf_sigma="0.003", audio_limit="0.99")
    model = build_hift(kw, TINY_F0_KW)
    assert model.m_source.sine_amp == pytest.approx(0.1)
    assert model.audio_limit == pytest.approx(0.99)
    assert isinstance(model.f0_predictor, ConvRNNF0Predictor)
