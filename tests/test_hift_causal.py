"""Causal HiFT vocoder of CosyVoice3 (light_tts.models.hift_causal): keys, causality, size, folding.

Numerical equality with the official CausalHiFTGenerator is checked in the official
code's venv by scripts/bench/check_cv3_hift.py; these tests only use our code.
"""
import pytest
import torch

from light_tts.models.hift import normalize_hift_state_dict
from light_tts.models.hift_causal import (CausalConvRNNF0Predictor, CausalHiFTGenerator, _NoiseTable,
                                          build_causal_hift)
from model_util import (CAUSAL_HIFT_KW, F0_KW, TINY_CAUSAL_HIFT_KW, TINY_F0_KW, key_shapes, legacy_hift_state_dict,
                        official_keys, random_mel, speech_like_hift)

pytestmark = pytest.mark.usefixtures("one_thread")

# Parameter count of the official CausalHiFTGenerator(**CAUSAL_HIFT_KW, f0_predictor=
# CausalConvRNNF0Predictor(**F0_KW)), recorded once with the official code.
OFFICIAL_FULL_PARAMS = 20_779_887

LOOK = 4                      # conv_pre_look_right
RIGHT_CONTEXT = 3 + LOOK + 1  # F0 lookahead + conv_pre lookahead + the dropped frame
SPF = 480                     # samples per mel frame
ATOL = 1e-6                   # fp32 noise between runs of different lengths (outputs are ~0.1)


def make_model(seed: int = 0, noise_seed: int = 0) -> CausalHiFTGenerator:
    torch.manual_seed(seed)
    model = build_causal_hift(dict(TINY_CAUSAL_HIFT_KW, noise_seed=noise_seed), TINY_F0_KW).eval()
    return speech_like_hift(model, f0_bias=100.0, f0_weight_scale=2000.0)  # ~50-250 Hz, a few frames unvoiced


@pytest.fixture(scope="module")
def model():
    return make_model()


def close(a, b, atol=ATOL):
    return a.shape == b.shape and (a.numel() == 0 or (a - b).abs().max().item() <= atol)


def test_state_dict_matches_official_tiny(model):
    # the official module built with TINY_CAUSAL_HIFT_KW / TINY_F0_KW (check_cv3_hift.py --print-keys)
    assert key_shapes(model.state_dict()) == official_keys("cv3_hift_tiny")


def test_full_size_parameter_count():
    model = build_causal_hift(CAUSAL_HIFT_KW, F0_KW)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_FULL_PARAMS


def test_shapes_and_dtypes(model):
    mel = random_mel(12, batch=2)
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
        model.inference(random_mel(RIGHT_CONTEXT - 1), finalize=False)


def test_streaming_samples_are_final(model):
    """finalize=False on T frames returns (T - 8) * 480 samples: the first T - 8 frames.

    Each of them equals, to fp32 noise, the same sample computed from any longer mel
    (finalize=False) and from the complete mel (finalize=True); so does the returned
    source over its (T - 3) * 480 samples. finalize=True on a prefix is not final in
    its last frames (its lookaheads read zeros).
    """
    mel = random_mel(30)
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
    mel = random_mel(24)
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
    mel = random_mel(14)
    a, sa = model.inference(mel)
    b_stream, _ = model.inference(mel, finalize=False)
    model.fold_weight_norm()
    assert not any("parametrizations" in k for k in model.state_dict())
    b, sb = model.inference(mel)
    assert torch.equal(sa, sb) or close(sa, sb)
    assert close(a, b)
    assert close(b_stream, model.inference(mel, finalize=False)[0])


def test_normalize_legacy_state_dict(model):
    fresh = make_model(seed=5)
    fresh.load_state_dict(normalize_hift_state_dict(legacy_hift_state_dict(model.state_dict())), strict=True)
    mel = random_mel(10)
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
    mel = random_mel(10)
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
    wav, src = model.inference(random_mel(9).to(torch.bfloat16))
    assert wav.dtype == torch.float32 and torch.isfinite(wav).all()


def test_build_coerces_strings_and_types():
    model = build_causal_hift(dict(TINY_CAUSAL_HIFT_KW, nsf_alpha="0.1", audio_limit="0.99", conv_pre_look_right="2"),
                              {"cond_channels": "32"})
    assert model.m_source.sine_amp == pytest.approx(0.1) and model.audio_limit == pytest.approx(0.99)
    assert model.conv_pre_look_right == 2 and model.right_context == 6
    assert isinstance(model.f0_predictor, CausalConvRNNF0Predictor)
    wav, _ = model.inference(random_mel(10), finalize=False)
    assert wav.shape == (1, 4 * SPF)
