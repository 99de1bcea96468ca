"""Causal HiFT vocoder of CosyVoice3 (light_tts.models.hift_causal): keys, causality, size, folding.

Numerical equality with the official CausalHiFTGenerator is checked in the official
code's venv by scripts/bench/check_cv3_hift.py; these tests only use our code.
"""
import pytest
import torch

from light_tts.models.hift import normalize_hift_state_dict
from light_tts.models.hift_causal import (CausalConvRNNF0Predictor, CausalHiFTGenerator, _NoiseTable,
                                          build_causal_hift)

# cosyvoice3.yaml's hift kwargs ...
FULL_KW = {
    "in_channels": 80, "base_channels": 512, "nb_harmonics": 8, "sampling_rate": 24000,
    "nsf_alpha": 0.1, "nsf_sigma": 0.003, "nsf_voiced_threshold": 10,
    "upsample_rates": [8, 5, 3], "upsample_kernel_sizes": [16, 11, 7],
    "istft_params": {"n_fft": 16, "hop_len": 4},
    "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5]] * 3,
    "source_resblock_kernel_sizes": [7, 7, 11], "source_resblock_dilation_sizes": [[1, 3, 5]] * 3,
    "lrelu_slope": 0.1, "audio_limit": 0.99, "conv_pre_look_right": 4,
}
FULL_F0 = {"num_class": 1, "in_channels": 80, "cond_channels": 512}
# ... and a tiny variant (same as scripts/bench/check_cv3_hift.py's): 32 channels, two
# resblock kernels per stage, short kernels. The structure (3 stages, strides 15/3/1,
# lookaheads 3 + 4) is the real one.
TINY_KW = dict(FULL_KW, base_channels=32, resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3]] * 2,
               source_resblock_kernel_sizes=[5, 5, 3], source_resblock_dilation_sizes=[[1, 3]] * 3)
TINY_F0 = dict(FULL_F0, cond_channels=32)

# Parameter count of the official CausalHiFTGenerator(**FULL_KW, f0_predictor=
# CausalConvRNNF0Predictor(**FULL_F0)), recorded once with the official code.
OFFICIAL_FULL_PARAMS = 20_779_887

# state_dict() of the official module built with TINY_KW / TINY_F0: "key shape" in order,
# recorded once with the official code (cosyvoice.hifigan.generator.CausalHiFTGenerator).
OFFICIAL_TINY_KEYS = """
m_source.l_linear.weight 1x9
m_source.l_linear.bias 1
conv_pre.bias 32
conv_pre.parametrizations.weight.original0 32x1x1
conv_pre.parametrizations.weight.original1 32x80x5
ups.0.bias 16
ups.0.parametrizations.weight.original0 16x1x1
ups.0.parametrizations.weight.original1 16x32x16
ups.1.bias 8
ups.1.parametrizations.weight.original0 8x1x1
ups.1.parametrizations.weight.original1 8x16x11
ups.2.bias 4
ups.2.parametrizations.weight.original0 4x1x1
ups.2.parametrizations.weight.original1 4x8x7
source_downs.0.weight 16x18x30
source_downs.0.bias 16
source_downs.1.weight 8x18x6
source_downs.1.bias 8
source_downs.2.weight 4x18x1
source_downs.2.bias 4
source_resblocks.0.convs1.0.bias 16
source_resblocks.0.convs1.0.parametrizations.weight.original0 16x1x1
source_resblocks.0.convs1.0.parametrizations.weight.original1 16x16x5
source_resblocks.0.convs1.1.bias 16
source_resblocks.0.convs1.1.parametrizations.weight.original0 16x1x1
source_resblocks.0.convs1.1.parametrizations.weight.original1 16x16x5
source_resblocks.0.convs2.0.bias 16
source_resblocks.0.convs2.0.parametrizations.weight.original0 16x1x1
source_resblocks.0.convs2.0.parametrizations.weight.original1 16x16x5
source_resblocks.0.convs2.1.bias 16
source_resblocks.0.convs2.1.parametrizations.weight.original0 16x1x1
source_resblocks.0.convs2.1.parametrizations.weight.original1 16x16x5
source_resblocks.0.activations1.0.alpha 16
source_resblocks.0.activations1.1.alpha 16
source_resblocks.0.activations2.0.alpha 16
source_resblocks.0.activations2.1.alpha 16
source_resblocks.1.convs1.0.bias 8
source_resblocks.1.convs1.0.parametrizations.weight.original0 8x1x1
source_resblocks.1.convs1.0.parametrizations.weight.original1 8x8x5
source_resblocks.1.convs1.1.bias 8
source_resblocks.1.convs1.1.parametrizations.weight.original0 8x1x1
source_resblocks.1.convs1.1.parametrizations.weight.original1 8x8x5
source_resblocks.1.convs2.0.bias 8
source_resblocks.1.convs2.0.parametrizations.weight.original0 8x1x1
source_resblocks.1.convs2.0.parametrizations.weight.original1 8x8x5
source_resblocks.1.convs2.1.bias 8
source_resblocks.1.convs2.1.parametrizations.weight.original0 8x1x1
source_resblocks.1.convs2.1.parametrizations.weight.original1 8x8x5
source_resblocks.1.activations1.0.alpha 8
source_resblocks.1.activations1.1.alpha 8
source_resblocks.1.activations2.0.alpha 8
source_resblocks.1.activations2.1.alpha 8
source_resblocks.2.convs1.0.bias 4
source_resblocks.2.convs1.0.parametrizations.weight.original0 4x1x1
source_resblocks.2.convs1.0.parametrizations.weight.original1 4x4x3
source_resblocks.2.convs1.1.bias 4
source_resblocks.2.convs1.1.parametrizations.weight.original0 4x1x1
source_resblocks.2.convs1.1.parametrizations.weight.original1 4x4x3
source_resblocks.2.convs2.0.bias 4
source_resblocks.2.convs2.0.parametrizations.weight.original0 4x1x1
source_resblocks.2.convs2.0.parametrizations.weight.original1 4x4x3
source_resblocks.2.convs2.1.bias 4
source_resblocks.2.convs2.1.parametrizations.weight.original0 4x1x1
source_resblocks.2.convs2.1.parametrizations.weight.original1 4x4x3
source_resblocks.2.activations1.0.alpha 4
source_resblocks.2.activations1.1.alpha 4
source_resblocks.2.activations2.0.alpha 4
source_resblocks.2.activations2.1.alpha 4
resblocks.0.convs1.0.bias 16
resblocks.0.convs1.0.parametrizations.weight.original0 16x1x1
resblocks.0.convs1.0.parametrizations.weight.original1 16x16x3
resblocks.0.convs1.1.bias 16
resblocks.0.convs1.1.parametrizations.weight.original0 16x1x1
resblocks.0.convs1.1.parametrizations.weight.original1 16x16x3
resblocks.0.convs2.0.bias 16
resblocks.0.convs2.0.parametrizations.weight.original0 16x1x1
resblocks.0.convs2.0.parametrizations.weight.original1 16x16x3
resblocks.0.convs2.1.bias 16
resblocks.0.convs2.1.parametrizations.weight.original0 16x1x1
resblocks.0.convs2.1.parametrizations.weight.original1 16x16x3
resblocks.0.activations1.0.alpha 16
resblocks.0.activations1.1.alpha 16
resblocks.0.activations2.0.alpha 16
resblocks.0.activations2.1.alpha 16
resblocks.1.convs1.0.bias 16
resblocks.1.convs1.0.parametrizations.weight.original0 16x1x1
resblocks.1.convs1.0.parametrizations.weight.original1 16x16x5
resblocks.1.convs1.1.bias 16
resblocks.1.convs1.1.parametrizations.weight.original0 16x1x1
resblocks.1.convs1.1.parametrizations.weight.original1 16x16x5
resblocks.1.convs2.0.bias 16
resblocks.1.convs2.0.parametrizations.weight.original0 16x1x1
resblocks.1.convs2.0.parametrizations.weight.original1 16x16x5
resblocks.1.convs2.1.bias 16
resblocks.1.convs2.1.parametrizations.weight.original0 16x1x1
resblocks.1.convs2.1.parametrizations.weight.original1 16x16x5
resblocks.1.activations1.0.alpha 16
resblocks.1.activations1.1.alpha 16
resblocks.1.activations2.0.alpha 16
resblocks.1.activations2.1.alpha 16
resblocks.2.convs1.0.bias 8
resblocks.2.convs1.0.parametrizations.weight.original0 8x1x1
resblocks.2.convs1.0.parametrizations.weight.original1 8x8x3
resblocks.2.convs1.1.bias 8
resblocks.2.convs1.1.parametrizations.weight.original0 8x1x1
resblocks.2.convs1.1.parametrizations.weight.original1 8x8x3
resblocks.2.convs2.0.bias 8
resblocks.2.convs2.0.parametrizations.weight.original0 8x1x1
resblocks.2.convs2.0.parametrizations.weight.original1 8x8x3
resblocks.2.convs2.1.bias 8
resblocks.2.convs2.1.parametrizations.weight.original0 8x1x1
resblocks.2.convs2.1.parametrizations.weight.original1 8x8x3
resblocks.2.activations1.0.alpha 8
resblocks.2.activations1.1.alpha 8
resblocks.2.activations2.0.alpha 8
resblocks.2.activations2.1.alpha 8
resblocks.3.convs1.0.bias 8
resblocks.3.convs1.0.parametrizations.weight.original0 8x1x1
resblocks.3.convs1.0.parametrizations.weight.original1 8x8x5
resblocks.3.convs1.1.bias 8
resblocks.3.convs1.1.parametrizations.weight.original0 8x1x1
resblocks.3.convs1.1.parametrizations.weight.original1 8x8x5
resblocks.3.convs2.0.bias 8
resblocks.3.convs2.0.parametrizations.weight.original0 8x1x1
resblocks.3.convs2.0.parametrizations.weight.original1 8x8x5
resblocks.3.convs2.1.bias 8
resblocks.3.convs2.1.parametrizations.weight.original0 8x1x1
resblocks.3.convs2.1.parametrizations.weight.original1 8x8x5
resblocks.3.activations1.0.alpha 8
resblocks.3.activations1.1.alpha 8
resblocks.3.activations2.0.alpha 8
resblocks.3.activations2.1.alpha 8
resblocks.4.convs1.0.bias 4
resblocks.4.convs1.0.parametrizations.weight.original0 4x1x1
resblocks.4.convs1.0.parametrizations.weight.original1 4x4x3
resblocks.4.convs1.1.bias 4
resblocks.4.convs1.1.parametrizations.weight.original0 4x1x1
resblocks.4.convs1.1.parametrizations.weight.original1 4x4x3
resblocks.4.convs2.0.bias 4
resblocks.4.convs2.0.parametrizations.weight.original0 4x1x1
resblocks.4.convs2.0.parametrizations.weight.original1 4x4x3
resblocks.4.convs2.1.bias 4
resblocks.4.convs2.1.parametrizations.weight.original0 4x1x1
resblocks.4.convs2.1.parametrizations.weight.original1 4x4x3
resblocks.4.activations1.0.alpha 4
resblocks.4.activations1.1.alpha 4
resblocks.4.activations2.0.alpha 4
resblocks.4.activations2.1.alpha 4
resblocks.5.convs1.0.bias 4
resblocks.5.convs1.0.parametrizations.weight.original0 4x1x1
resblocks.5.convs1.0.parametrizations.weight.original1 4x4x5
resblocks.5.convs1.1.bias 4
resblocks.5.convs1.1.parametrizations.weight.original0 4x1x1
resblocks.5.convs1.1.parametrizations.weight.original1 4x4x5
resblocks.5.convs2.0.bias 4
resblocks.5.convs2.0.parametrizations.weight.original0 4x1x1
resblocks.5.convs2.0.parametrizations.weight.original1 4x4x5
resblocks.5.convs2.1.bias 4
resblocks.5.convs2.1.parametrizations.weight.original0 4x1x1
resblocks.5.convs2.1.parametrizations.weight.original1 4x4x5
resblocks.5.activations1.0.alpha 4
resblocks.5.activations1.1.alpha 4
resblocks.5.activations2.0.alpha 4
resblocks.5.activations2.1.alpha 4
conv_post.bias 18
conv_post.parametrizations.weight.original0 18x1x1
conv_post.parametrizations.weight.original1 18x4x7
f0_predictor.condnet.0.bias 32
f0_predictor.condnet.0.parametrizations.weight.original0 32x1x1
f0_predictor.condnet.0.parametrizations.weight.original1 32x80x4
f0_predictor.condnet.2.bias 32
f0_predictor.condnet.2.parametrizations.weight.original0 32x1x1
f0_predictor.condnet.2.parametrizations.weight.original1 32x32x3
f0_predictor.condnet.4.bias 32
f0_predictor.condnet.4.parametrizations.weight.original0 32x1x1
f0_predictor.condnet.4.parametrizations.weight.original1 32x32x3
f0_predictor.condnet.6.bias 32
f0_predictor.condnet.6.parametrizations.weight.original0 32x1x1
f0_predictor.condnet.6.parametrizations.weight.original1 32x32x3
f0_predictor.condnet.8.bias 32
f0_predictor.condnet.8.parametrizations.weight.original0 32x1x1
f0_predictor.condnet.8.parametrizations.weight.original1 32x32x3
f0_predictor.classifier.weight 1x32
f0_predictor.classifier.bias 1
"""

LOOK = 4                      # conv_pre_look_right
RIGHT_CONTEXT = 3 + LOOK + 1  # F0 lookahead + conv_pre lookahead + the dropped frame
SPF = 480                     # samples per mel frame
ATOL = 1e-6                   # fp32 noise between runs of different lengths (outputs are ~0.1)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def make_model(seed: int = 0, noise_seed: int = 0) -> CausalHiFTGenerator:
    torch.manual_seed(seed)
    model = build_causal_hift(dict(TINY_KW, noise_seed=noise_seed), TINY_F0).eval()
    with torch.no_grad():
        # F0 in a speech-like range (~50-250 Hz, a few frames unvoiced); Snake alphas spread.
        model.f0_predictor.classifier.weight.mul_(2000.0)
        model.f0_predictor.classifier.bias.fill_(100.0)
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 1.5)
    return model


def make_mel(frames: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 80, frames, generator=g) * 2 - 5


@pytest.fixture(scope="module")
def model():
    return make_model()


def close(a, b, atol=ATOL):
    return a.shape == b.shape and (a.numel() == 0 or (a - b).abs().max().item() <= atol)


def test_state_dict_matches_official_tiny(model):
    expected = [tuple(line.split()) for line in OFFICIAL_TINY_KEYS.strip().splitlines()]
    ours = [(k, "x".join(map(str, v.shape))) for k, v in model.state_dict().items()]
    assert ours == expected


def test_full_size_parameter_count():
    model = build_causal_hift(FULL_KW, FULL_F0)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_FULL_PARAMS


def test_shapes_and_dtypes(model):
    mel = make_mel(12, batch=2)
    wav, src = model.inference(mel, finalize=True)
    assert wav.shape == (2, 12 * SPF) and src.shape == (2, 1, 12 * SPF)
    wav, src = model.inference(mel, finalize=False)
    assert wav.shape == (2, (12 - RIGHT_CONTEXT) * SPF) and src.shape == (2, 1, (12 - 3) * SPF)
    assert wav.dtype == torch.float32 and src.dtype == torch.float32
    assert torch.isfinite(wav).all() and 0 < wav.abs().max() <= 0.99
    f0 = model.f0_predictor(mel.double())
    assert 0.5 < (f0 > 10).double().mean() < 1.0  # voiced and unvoiced frames both present
    assert model.right_context == RIGHT_CONTEXT
    with pytest.raises(ValueError):
        model.inference(make_mel(RIGHT_CONTEXT - 1), finalize=False)


def test_streaming_samples_are_final(model):
    """finalize=False on T frames returns (T - 8) * 480 samples: the first T - 8 frames.

    Each of them equals, to fp32 noise, the same sample computed from any longer mel
    (finalize=False) and from the complete mel (finalize=True); so does the returned
    source over its (T - 3) * 480 samples. finalize=True on a prefix is not final in
    its last frames (its lookaheads read zeros).
    """
    mel = make_mel(30)
    full, full_src = model.inference(mel, finalize=True)
    for frames in (RIGHT_CONTEXT, 9, 16, 23):
        part, src = model.inference(mel[:, :, :frames], finalize=False)
        assert part.shape == (1, (frames - RIGHT_CONTEXT) * SPF)
        assert close(part, full[:, :part.shape[-1]])
        assert close(src, full_src[:, :, :(frames - 3) * SPF])
        longer, _ = model.inference(mel[:, :, :frames + 5], finalize=False)
        assert close(part, longer[:, :part.shape[-1]])
        if frames > RIGHT_CONTEXT:
            closed, _ = model.inference(mel[:, :, :frames], finalize=True)
            assert (closed[:, -SPF:] - full[:, (frames - 1) * SPF:frames * SPF]).abs().max() > 100 * ATOL


def test_right_receptive_field(model):
    """Changing mel frame k changes no sample before 480 * (k - 4) - 8, and does change the next frames."""
    mel = make_mel(24)
    ref, _ = model.inference(mel)
    for k in (6, 13, 23):
        bumped = mel.clone()
        bumped[:, :, k] += 1.0
        out, _ = model.inference(bumped)
        first = SPF * (k - LOOK) - 8
        assert torch.equal(out[:, :first], ref[:, :first])
        assert not torch.equal(out[:, first:first + SPF], ref[:, first:first + SPF])  # tight within a frame


def test_fold_weight_norm():
    model = make_model()
    mel = make_mel(14)
    a, sa = model.inference(mel)
    b_stream, _ = model.inference(mel, finalize=False)
    model.fold_weight_norm()
    assert not any("parametrizations" in k for k in model.state_dict())
    b, sb = model.inference(mel)
    assert torch.equal(sa, sb) or close(sa, sb)
    assert close(a, b)
    assert close(b_stream, model.inference(mel, finalize=False)[0])


def test_normalize_legacy_state_dict(model):
    legacy = {}
    for k, v in model.state_dict().items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g")
        k = k.replace(".parametrizations.weight.original1", ".weight_v")
        legacy["generator." + k] = v.clone()
    fresh = make_model(seed=5)
    fresh.load_state_dict(normalize_hift_state_dict(legacy), strict=True)
    mel = make_mel(10)
    assert torch.equal(fresh.inference(mel)[0], model.inference(mel)[0])


def test_noise_table_is_the_official_stream(monkeypatch):
    """rand(1, 9) then rand(1, N, 9) after manual_seed(s), drawn in pieces."""
    torch.manual_seed(3)
    torch.rand(1, 9)
    expected = torch.rand(1, 1000, 9)
    monkeypatch.setattr(_NoiseTable, "_GROW_ROWS", 64)
    table = _NoiseTable(9, seed=3)
    assert torch.equal(table.rows(10, torch.device("cpu")), expected[:, :10])
    assert torch.equal(table.rows(1000, torch.device("cpu")), expected)   # grown in several draws
    assert torch.equal(table.rows(5, torch.device("cpu")), expected[:, :5])


def test_noise_seed_changes_only_the_noise():
    mel = make_mel(10)
    a, sa = make_model(noise_seed=0).inference(mel)
    b, sb = make_model(noise_seed=0).inference(mel)
    c, sc = make_model(noise_seed=1).inference(mel)
    assert torch.equal(a, b) and torch.equal(sa, sb)         # no per-call randomness
    assert 1e-4 < (sa - sc).abs().max() < 0.1                # noise, not signal


def test_f0_predictor_stays_float64():
    model = make_model()
    model.float()
    assert all(p.dtype == torch.float64 for p in model.f0_predictor.parameters())
    assert model.conv_pre.parametrizations.weight.original1.dtype == torch.float32
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.float64 for p in model.f0_predictor.parameters())
    wav, src = model.inference(make_mel(9).to(torch.bfloat16))
    assert wav.dtype == torch.float32 and torch.isfinite(wav).all()


def test_build_coerces_strings_and_types():
    model = build_causal_hift(dict(TINY_KW, nsf_alpha="0.1", audio_limit="0.99", conv_pre_look_right="2"),
                              {"cond_channels": "32"})
    assert model.m_source.sine_amp == pytest.approx(0.1) and model.audio_limit == pytest.approx(0.99)
    assert model.conv_pre_look_right == 2 and model.right_context == 6
    assert isinstance(model.f0_predictor, CausalConvRNNF0Predictor)
    wav, _ = model.inference(make_mel(10), finalize=False)
    assert wav.shape == (1, 4 * SPF)
