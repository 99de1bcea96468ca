"""Acoustic features of the prompt, computed as the official CosyVoice2 frontend does.

Three features, each feeding one model:

- :func:`whisper_log_mel` - 128-bin Whisper log-mel of 16 kHz audio, the
  input of ``speech_tokenizer_v2.onnx`` (official: ``whisper.log_mel_spectrogram``).
- :func:`kaldi_fbank` - 80-bin Kaldi filterbank of 16 kHz audio, mean
  normalised over time, the input of ``campplus.onnx``
  (official: ``torchaudio.compliance.kaldi.fbank`` with its defaults).
- :func:`prompt_mel_24k` - 80-bin log-magnitude mel of 24 kHz audio, the
  flow model's prompt condition (official: Matcha-TTS ``mel_spectrogram``).

Neither whisper nor torchaudio nor librosa is needed: the STFTs use
``torch.stft`` / ``torch.fft`` with the same arguments as the originals,
and the mel filterbanks are computed here from their published formulas
(librosa's Slaney filters, Kaldi's mel banks). Everything runs in float32
on the device of the input tensor.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

# ---------------------------------------------------------------------------
# Slaney mel filterbank (librosa.filters.mel with htk=False, norm='slaney')
# ---------------------------------------------------------------------------

# The Slaney mel scale is linear below 1 kHz (200/3 Hz per mel) and
# logarithmic above it (27 mels per factor 6.4).
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_START_MEL = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_slaney_mel(hz: np.ndarray | float) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _SLANEY_HZ_PER_MEL
    with np.errstate(divide="ignore"):
        logarithmic = _SLANEY_LOG_START_MEL + np.log(np.maximum(hz, 1e-300) / _SLANEY_LOG_START_HZ) / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_LOG_START_HZ, logarithmic, linear)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_LOG_START_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_LOG_START_MEL))
    return np.where(mel >= _SLANEY_LOG_START_MEL, logarithmic, linear)


@functools.lru_cache(maxsize=8)
def slaney_mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Triangular mel filters [n_mels, n_fft // 2 + 1], float32, area-normalised.

    Filter ``i`` rises linearly from mel point i to i+1 and falls to i+2,
    where the n_mels + 2 points are equally spaced on the Slaney mel scale
    between fmin and fmax; each filter is then scaled by 2 / (its width in
    Hz) so every filter has the same area (librosa's norm='slaney').
    The returned array is read-only (it is cached and shared).
    """
    if fmax is None:
        fmax = sr / 2.0
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mel_points = np.linspace(_hz_to_slaney_mel(fmin), _hz_to_slaney_mel(fmax), n_mels + 2)
    edges_hz = _slaney_mel_to_hz(mel_points)
    widths = np.diff(edges_hz)
    # distance of every FFT bin from every edge: [n_mels + 2, n_bins]
    offset = edges_hz[:, None] - fft_hz[None, :]
    rising = -offset[:-2] / widths[:-1, None]
    falling = offset[2:] / widths[1:, None]
    # librosa stores the triangles in float32 before applying the area norm
    tri = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area_norm = 2.0 / (edges_hz[2:] - edges_hz[:-2])
    filters = (tri * area_norm[:, None]).astype(np.float32)
    filters.setflags(write=False)
    return filters


def _to_signal(audio, name: str) -> torch.Tensor:
    """Accept numpy or torch, shape [N] or [1, N]; return float32 tensor [N]."""
    x = torch.as_tensor(audio) if not isinstance(audio, torch.Tensor) else audio
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise ValueError(f"{name} expects mono audio of shape [N] or [1, N], got {tuple(x.shape)}")
    return x.to(torch.float32)


# ---------------------------------------------------------------------------
# Whisper log-mel (speech tokenizer input)
# ---------------------------------------------------------------------------

WHISPER_N_FFT = 400
WHISPER_HOP = 160


def whisper_log_mel(audio16k, n_mels: int = 128) -> torch.Tensor:
    """Whisper's log-mel spectrogram of 16 kHz audio: [1, n_mels, N // 160].

    Centred STFT (reflect padding of n_fft // 2), periodic Hann window of
    400, hop 160; the last frame is dropped; power spectrum through Slaney
    mel filters; log10 with a 1e-10 floor; values more than 8 (80 dB) below
    the maximum are raised to max - 8; finally (x + 4) / 4.
    """
    x = _to_signal(audio16k, "whisper_log_mel")
    if x.shape[0] <= WHISPER_N_FFT // 2:
        raise ValueError(f"whisper_log_mel needs more than {WHISPER_N_FFT // 2} samples, got {x.shape[0]}")
    window = torch.hann_window(WHISPER_N_FFT, device=x.device)
    spec = torch.stft(x, WHISPER_N_FFT, WHISPER_HOP, window=window, center=True,
                      pad_mode="reflect", return_complex=True)
    power = spec[:, :-1].abs() ** 2  # [201, T]
    filters = torch.from_numpy(np.array(slaney_mel_filters(16000, WHISPER_N_FFT, n_mels))).to(x.device)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).unsqueeze(0)


# ---------------------------------------------------------------------------
# Kaldi fbank (speaker embedding input)
# ---------------------------------------------------------------------------

# torchaudio.compliance.kaldi.fbank defaults (the official passes only
# num_mel_bins=80, dither=0, sample_frequency=16000).
KALDI_FRAME_LENGTH_MS = 25.0
KALDI_FRAME_SHIFT_MS = 10.0
KALDI_PREEMPHASIS = 0.97
KALDI_LOW_FREQ = 20.0
KALDI_POVEY_POWER = 0.85
# log floor: numeric_limits<float>::epsilon()
KALDI_EPSILON = float(np.finfo(np.float32).eps)


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float,
                    low_freq: float = KALDI_LOW_FREQ, high_freq: float = 0.0) -> np.ndarray:
    """Kaldi triangular mel banks [num_bins, padded_window // 2 + 1], float32.

    Triangles are linear in Kaldi's mel (1127 ln(1 + f / 700)), with
    num_bins + 2 equally spaced edges between low_freq and high_freq
    (high_freq <= 0 means an offset from Nyquist). No area normalisation.
    The Nyquist bin gets weight 0, as in Kaldi.

    Computed in float32 torch arithmetic, in the same order as
    torchaudio.compliance.kaldi.get_mel_banks: a float64 version differs by
    up to 1.4e-5 per weight, which shows up as ~2e-4 in the log fbank of
    quiet bins. Matching the rounding makes the fbank agree to ~1e-6.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < high_freq <= nyquist):
        raise ValueError(f"bad mel range low={low_freq} high={high_freq} nyquist={nyquist}")

    def to_mel(hz):
        return 1127.0 * (1.0 + hz / 700.0).log()

    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    step = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + index * step
    centre = mel_low + (index + 1.0) * step
    right = mel_low + (index + 2.0) * step
    bin_mel = to_mel((sample_rate / padded_window) * torch.arange(float(padded_window // 2))).unsqueeze(0)
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    banks = torch.nn.functional.pad(banks, (0, 1)).to(torch.float32).numpy()
    banks.setflags(write=False)
    return banks


def _next_power_of_two(n: int) -> int:
    return 1 if n == 0 else 1 << (n - 1).bit_length()


def kaldi_fbank(audio16k, num_mel_bins: int = 80, dither: float = 0.0, *,
                sample_frequency: float = 16000.0, subtract_mean: bool = True) -> torch.Tensor:
    """Kaldi log-mel filterbank [T, num_mel_bins], mean-normalised over time.

    Frames of 25 ms every 10 ms that fit entirely in the signal
    (snip_edges); per frame: optional Gaussian dither, DC removal,
    pre-emphasis 0.97 (the first sample is pre-emphasised against itself),
    Povey window (Hann ** 0.85), zero-pad to a power of two (512 at 16 kHz),
    power spectrum, Kaldi mel banks, natural log floored at float32 eps.
    The official frontend then subtracts the mean over time
    (``subtract_mean=True``). Input is float audio in [-1, 1] as loaded
    (Kaldi's int16 scale is NOT applied, as in the official code).
    """
    x = _to_signal(audio16k, "kaldi_fbank")
    shift = int(sample_frequency * KALDI_FRAME_SHIFT_MS * 0.001)
    size = int(sample_frequency * KALDI_FRAME_LENGTH_MS * 0.001)
    padded = _next_power_of_two(size)
    if x.shape[0] < size:
        raise ValueError(f"kaldi_fbank needs at least {size} samples, got {x.shape[0]}")

    frames = x.unfold(0, size, shift)  # [T, size], only frames that fit
    if dither != 0.0:
        frames = frames + torch.randn_like(frames) * dither
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - KALDI_PREEMPHASIS * previous
    window = torch.hann_window(size, periodic=False, dtype=torch.float32, device=x.device).pow(KALDI_POVEY_POWER)
    frames = torch.nn.functional.pad(frames * window, (0, padded - size))
    power = torch.fft.rfft(frames).abs().pow(2.0)  # [T, padded // 2 + 1]
    banks = torch.from_numpy(np.array(kaldi_mel_banks(num_mel_bins, padded, sample_frequency))).to(x.device)
    feat = torch.clamp(power @ banks.T, min=KALDI_EPSILON).log()
    if subtract_mean:
        feat = feat - feat.mean(dim=0, keepdim=True)
    return feat


# ---------------------------------------------------------------------------
# 24 kHz prompt mel (flow model condition)
# ---------------------------------------------------------------------------

MEL24K_N_FFT = 1920
MEL24K_HOP = 480
MEL24K_WIN = 1920
MEL24K_N_MELS = 80
MEL24K_FMIN = 0.0
MEL24K_FMAX = 8000.0


def prompt_mel_24k(audio24k, fmax: float | None = MEL24K_FMAX) -> torch.Tensor:
    """Matcha-TTS mel of 24 kHz audio as the official frontend shapes it: [1, T, 80].

    Reflect-pad (n_fft - hop) / 2 = 720 samples on both sides, STFT without
    centring (n_fft 1920, hop 480, periodic Hann 1920), magnitude
    sqrt(re^2 + im^2 + 1e-9), Slaney mel filters 0-8 kHz, natural log
    floored at 1e-5. T = N // 480.
    """
    x = _to_signal(audio24k, "prompt_mel_24k")
    pad = (MEL24K_N_FFT - MEL24K_HOP) // 2
    if x.shape[0] <= pad:
        raise ValueError(f"prompt_mel_24k needs more than {pad} samples, got {x.shape[0]}")
    x = torch.nn.functional.pad(x[None, None], (pad, pad), mode="reflect")[0]
    window = torch.hann_window(MEL24K_WIN, device=x.device)
    spec = torch.stft(x, MEL24K_N_FFT, hop_length=MEL24K_HOP, win_length=MEL24K_WIN, window=window,
                      center=False, normalized=False, onesided=True, return_complex=True)
    spec = torch.view_as_real(spec)
    magnitude = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)  # [1, 961, T]
    filters = torch.from_numpy(np.array(slaney_mel_filters(24000, MEL24K_N_FFT, MEL24K_N_MELS,
                                                           MEL24K_FMIN, fmax))).to(x.device)
    mel = torch.log(torch.clamp(filters @ magnitude, min=1e-5))  # [1, 80, T]
    return mel.transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------
# Prompt feature / token alignment
# ---------------------------------------------------------------------------

def align_feat_and_tokens(feat, tokens, ratio: int = 2):
    """Trim prompt mel and prompt speech tokens so frames == ratio * tokens.

    The flow model upsamples tokens by ``token_mel_ratio`` (2 for
    CosyVoice2: 25 Hz tokens, 50 Hz mel), so the official frontend keeps
    ``n = min(frames // 2, tokens)`` tokens and the first 2n mel frames.
    ``feat`` is [..., T, D] (time on the second-to-last axis, e.g. [1, T, 80]),
    ``tokens`` is [..., L] (time last, e.g. [1, L]); torch or numpy.
    Returns (feat, tokens, n_tokens).
    """
    n_frames = feat.shape[-2]
    n_tokens = min(n_frames // ratio, tokens.shape[-1])
    return feat[..., : ratio * n_tokens, :], tokens[..., :n_tokens], n_tokens
