"""Prompt features against independent re-derivations on real speech.

Each reference here is written differently from light_tts.frontend.features:
plain numpy in float64, explicit per-frame / per-filter loops, the published
formulas (Whisper's log-mel, Kaldi's fbank, Matcha-TTS's mel), and, for the
fbank, kaldi-native-fbank (a C++ Kaldi port) when it is installed.
The speech is tests/fixtures/speech_16k.wav (espeak-ng, 3.3 s).
"""

import math
import os

import numpy as np
import pytest
import torch

from light_tts.frontend.audio import load_audio
from light_tts.frontend.features import (
    align_feat_and_tokens,
    kaldi_fbank,
    kaldi_mel_banks,
    prompt_mel_24k,
    slaney_mel_filters,
    whisper_log_mel,
)

SPEECH_WAV = os.path.join(os.path.dirname(__file__), "fixtures", "speech_16k.wav")


@pytest.fixture(scope="module")
def speech16():
    return load_audio(SPEECH_WAV, 16000)


@pytest.fixture(scope="module")
def speech24():
    return load_audio(SPEECH_WAV, 24000)


# ---------------------------------------------------------------- mel filters


def slaney_hz_to_mel(f):
    # Slaney's Auditory Toolbox: 3 mels per 200 Hz up to 1 kHz, then log spaced
    if f < 1000.0:
        return 3.0 * f / 200.0
    return 15.0 + 27.0 * math.log(f / 1000.0) / math.log(6.4)


def slaney_mel_to_hz(m):
    if m < 15.0:
        return 200.0 * m / 3.0
    return 1000.0 * 6.4 ** ((m - 15.0) / 27.0)


def slaney_filters_reference(sr, n_fft, n_mels, fmin, fmax):
    """Filter by filter, bin by bin: triangles in Hz between Slaney mel edges."""
    lo, hi = slaney_hz_to_mel(fmin), slaney_hz_to_mel(fmax)
    edges = [slaney_mel_to_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    out = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if left < f < right:
                w = (f - left) / (centre - left) if f <= centre else (right - f) / (right - centre)
                out[m, k] = w * 2.0 / (right - left)
    return out


@pytest.mark.parametrize("args", [(16000, 400, 128, 0.0, 8000.0), (24000, 1920, 80, 0.0, 8000.0)])
def test_slaney_filters_match_formula(args):
    ours = slaney_mel_filters(*args)
    ref = slaney_filters_reference(*args)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-9)
    # every filter is non-empty and centres increase
    assert (ours.max(axis=1) > 0).all()
    assert (np.diff(ours.argmax(axis=1)) >= 0).all()


def test_kaldi_banks_match_formula():
    banks = kaldi_mel_banks(80, 512, 16000.0)
    assert banks.shape == (80, 257)
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    step = (hi - lo) / 81
    for m in (0, 1, 40, 79):
        left, centre, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
        for k in range(256):
            x = mel(k * 16000.0 / 512)
            ref = max(0.0, min((x - left) / (centre - left), (right - x) / (right - centre)))
            assert abs(banks[m, k] - ref) < 2e-5
    assert (banks[:, 256] == 0).all()


# ---------------------------------------------------------------- whisper log-mel


def whisper_reference(audio, n_mels=128):
    """Whisper log_mel_spectrogram, written out frame by frame in float64."""
    x = audio.astype(np.float64)
    n_fft, hop = 400, 160
    padded = np.pad(x, n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    n_frames = 1 + (len(padded) - n_fft) // hop
    filters = slaney_filters_reference(16000, n_fft, n_mels, 0.0, 8000.0)
    mel = np.zeros((n_mels, n_frames - 1))
    for t in range(n_frames - 1):  # whisper drops the last frame
        frame = padded[t * hop: t * hop + n_fft] * window
        mel[:, t] = filters @ (np.abs(np.fft.rfft(frame)) ** 2)
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def test_whisper_log_mel_matches_reference(speech16):
    ours = whisper_log_mel(speech16)
    assert ours.shape == (1, 128, len(speech16) // 160) and ours.dtype == torch.float32
    ref = whisper_reference(speech16)
    diff = np.abs(ours[0].numpy() - ref)
    # fp32 STFT vs float64: tiny everywhere, larger only in bins near the -80 dB floor
    assert diff.max() < 5e-4, diff.max()  # measured 3.7e-5
    assert diff.mean() < 3e-6, diff.mean()  # measured 3.0e-7


def test_whisper_log_mel_accepts_numpy_and_batch_dim(speech16):
    a = whisper_log_mel(speech16)
    b = whisper_log_mel(torch.from_numpy(speech16)[None])
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        whisper_log_mel(np.zeros(150, np.float32))


# ---------------------------------------------------------------- kaldi fbank


def kaldi_fbank_reference(audio, num_bins=80):
    """Kaldi compute-fbank-feats defaults, one frame at a time, float64."""
    x = audio.astype(np.float64)
    size, shift, n_fft = 400, 160, 512
    n = np.arange(size)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * n / (size - 1))) ** 0.85
    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    step = (hi - lo) / (num_bins + 1)
    bin_mel = mel(np.arange(n_fft // 2) * 16000.0 / n_fft)
    rows = []
    for start in range(0, len(x) - size + 1, shift):
        frame = x[start: start + size].copy()
        frame -= frame.mean()
        emphasised = np.empty_like(frame)
        emphasised[0] = frame[0] - 0.97 * frame[0]
        emphasised[1:] = frame[1:] - 0.97 * frame[:-1]
        spectrum = np.abs(np.fft.rfft(emphasised * povey, n_fft)) ** 2
        energies = []
        for m in range(num_bins):
            left, centre, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
            w = np.clip(np.minimum((bin_mel - left) / (centre - left), (right - bin_mel) / (right - centre)), 0, None)
            energies.append(max(float(np.dot(w, spectrum[:-1])), np.finfo(np.float32).eps))
        rows.append(np.log(energies))
    return np.array(rows)


def test_kaldi_fbank_matches_loop_reference(speech16):
    ours = kaldi_fbank(speech16, subtract_mean=False)
    assert ours.shape == (1 + (len(speech16) - 400) // 160, 80)
    ref = kaldi_fbank_reference(speech16)
    diff = np.abs(ours.numpy() - ref)
    # natural log of fp32 power: quiet bins carry the largest absolute error
    assert diff.max() < 3e-3, diff.max()  # measured 5.4e-4
    assert diff.mean() < 3e-5, diff.mean()  # measured 5.1e-6


def test_kaldi_fbank_matches_kaldi_native_fbank(speech16):
    try:
        import kaldi_native_fbank as knf
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kaldi-native-fbank is not installed (pip install kaldi-native-fbank)")
        pytest.skip("kaldi-native-fbank is not installed")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = 80
    # Kaldi's own mel scale (1127 ln(1 + f/700)), not the Slaney one knf may default to
    if hasattr(opts.mel_opts, "use_slaney_mel_scale"):
        opts.mel_opts.use_slaney_mel_scale = False
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, speech16.tolist())
    fb.input_finished()
    ref = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
    ours = kaldi_fbank(speech16, subtract_mean=False).numpy()
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref)
    assert diff.max() < 3e-3, diff.max()  # measured 7.6e-4
    assert diff.mean() < 5e-5, diff.mean()  # measured 8.1e-6


def test_kaldi_fbank_mean_normalisation(speech16):
    raw = kaldi_fbank(speech16, subtract_mean=False)
    normed = kaldi_fbank(speech16)
    torch.testing.assert_close(normed, raw - raw.mean(dim=0, keepdim=True))
    assert normed.mean(dim=0).abs().max() < 1e-4


def test_kaldi_fbank_dither_changes_output_only_when_asked(speech16):
    torch.manual_seed(0)
    a = kaldi_fbank(speech16)
    assert torch.equal(a, kaldi_fbank(speech16))
    b = kaldi_fbank(speech16, dither=1.0)
    assert not torch.equal(a, b)


# ---------------------------------------------------------------- 24 kHz prompt mel


def matcha_mel_reference(audio):
    """Matcha-TTS mel_spectrogram (n_fft 1920, hop 480, 80 mels, 0-8 kHz) in float64."""
    x = audio.astype(np.float64)
    n_fft, hop = 1920, 480
    pad = (n_fft - hop) // 2
    padded = np.pad(x, pad, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    n_frames = 1 + (len(padded) - n_fft) // hop
    filters = slaney_filters_reference(24000, n_fft, 80, 0.0, 8000.0)
    out = np.zeros((n_frames, 80))
    for t in range(n_frames):
        spec = np.fft.rfft(padded[t * hop: t * hop + n_fft] * window)
        magnitude = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
        out[t] = np.log(np.maximum(filters @ magnitude, 1e-5))
    return out


def test_prompt_mel_24k_matches_reference(speech24):
    ours = prompt_mel_24k(speech24)
    assert ours.shape == (1, len(speech24) // 480, 80) and ours.dtype == torch.float32
    ref = matcha_mel_reference(speech24)
    diff = np.abs(ours[0].numpy() - ref)
    assert diff.max() < 1e-3, diff.max()  # measured 9.5e-5
    assert diff.mean() < 5e-6, diff.mean()  # measured 7.2e-7


def test_feature_frame_rates_line_up(speech16, speech24):
    # 100 Hz whisper mel -> 25 Hz tokens; 50 Hz prompt mel = 2 x tokens
    n_mel = whisper_log_mel(speech16).shape[2]
    n_feat = prompt_mel_24k(speech24).shape[1]
    assert abs(n_feat - n_mel / 2) <= 1


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("frames,tokens,expect", [(164, 85, 82), (170, 80, 80), (165, 90, 82), (1, 3, 0), (10, 0, 0)])
def test_align_feat_and_tokens(frames, tokens, expect):
    feat = torch.randn(1, frames, 80)
    tok = torch.arange(tokens, dtype=torch.int32)[None]
    f, t, n = align_feat_and_tokens(feat, tok)
    assert n == expect
    assert f.shape == (1, 2 * expect, 80) and t.shape == (1, expect)
    assert torch.equal(f, feat[:, : 2 * expect]) and torch.equal(t, tok[:, :expect])
    # numpy and unbatched inputs work the same way
    f2, t2, n2 = align_feat_and_tokens(feat[0].numpy(), tok[0].numpy())
    assert n2 == expect and f2.shape == (2 * expect, 80) and t2.shape == (expect,)


def test_align_other_ratio():
    f, t, n = align_feat_and_tokens(np.zeros((1, 100, 80)), np.zeros((1, 40)), ratio=3)
    assert n == 33 and f.shape == (1, 99, 80) and t.shape == (1, 33)
