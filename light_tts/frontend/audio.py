"""Prompt audio: decode, validate, resample, and the official prompt clean-up.

The official CosyVoice2 frontend reads a prompt with
``torchaudio.load(..., backend='soundfile')``, averages the channels and
resamples to the rate each feature needs (16 kHz for the speech tokenizer
and the speaker embedding, 24 kHz for the prompt mel). We do the same
without torchaudio: soundfile decodes (its bundled libsndfile reads WAV,
FLAC, OGG/Vorbis/Opus and MP3) and soxr resamples.

Differences from the official code, on purpose:
- resampling uses soxr's high-quality mode by default; ``resampler="sinc"``
  selects our reimplementation of torchaudio's default ``Resample`` (the
  official one), which reproduces the official samples to float32 rounding;
- bad input raises :class:`AudioError` with a message a client can read,
  instead of an ``assert`` or a decoder traceback.

The server takes uploads as bytes: everything here works on bytes as well
as on paths, and never writes temporary files.
"""

from __future__ import annotations

import functools
import io
import math
import os
from typing import BinaryIO, Union

import numpy as np
import soundfile as sf
import soxr
import torch

AudioSource = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]

# Defaults of the official prompt clean-up (``postprocess`` of the official
# web UI): librosa.effects.trim(top_db=60, frame_length=440, hop_length=220),
# peak limited to 0.8, then 0.2 s of silence appended.
PROMPT_TOP_DB = 60.0
PROMPT_FRAME_LENGTH = 440
PROMPT_HOP_LENGTH = 220
PROMPT_MAX_VAL = 0.8
PROMPT_TAIL_SECONDS = 0.2


class AudioError(ValueError):
    """Prompt audio that cannot be used; the message is meant for the client."""


def _as_sound_file_input(data: AudioSource):
    """Return something soundfile can open, rejecting empty input early."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if len(raw) == 0:
            raise AudioError("audio data is empty (0 bytes)")
        return io.BytesIO(raw)
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.isfile(path):
            raise AudioError(f"audio file not found: {path}")
        if os.path.getsize(path) == 0:
            raise AudioError(f"audio file is empty (0 bytes): {path}")
        return path
    if hasattr(data, "read"):
        return data
    raise AudioError(f"unsupported audio source type: {type(data).__name__}")


def _too_long(duration: float, limit: float) -> AudioError:
    return AudioError(f"audio is too long: {duration:.2f} s (maximum {limit:g} s)")


def decode_audio(data: AudioSource, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode to (float32 samples [frames, channels], sample_rate).

    Integer PCM is scaled to [-1, 1) the way libsndfile (and so torchaudio's
    soundfile backend) does it: int16 / 32768, int32 / 2**31.
    With ``max_seconds``, a file whose header already announces more than
    that is refused before its samples are decoded (an upload cannot make
    us decode an hour of audio only to reject it).
    """
    source = _as_sound_file_input(data)
    try:
        with sf.SoundFile(source) as f:
            sample_rate = int(f.samplerate)
            if sample_rate <= 0:
                raise AudioError(f"invalid sample rate {sample_rate}")
            if f.channels < 1:
                raise AudioError("audio has no channels")
            if max_seconds is not None and f.frames > 0 and f.frames / sample_rate > max_seconds:
                raise _too_long(f.frames / sample_rate, max_seconds)
            samples = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # libsndfile raises several types; all mean "bad file"
        detail = str(exc).strip() or type(exc).__name__
        raise AudioError(
            "could not decode audio (supported: WAV, FLAC, OGG, MP3): " + detail
        ) from None
    return samples, sample_rate


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, zero_crossings: int = 6, rolloff: float = 0.99):
    """Polyphase Hann-windowed sinc low-pass kernel, one row per output phase.

    Same construction (and rounding) as torchaudio's default ``Resample``
    (sinc_interp_hann, lowpass_filter_width 6, rolloff 0.99), which the
    official frontend and its training data pipeline use: the cut-off is
    0.99 x the lower Nyquist, the sinc is cut after 6 zero crossings with a
    cos^2 window, built in float64 and stored as float32.
    Rates are already divided by their gcd. Returns (kernel [new, 1, K], width).
    """
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # output phase j sits at -j / new input periods from the tap grid
    t = torch.arange(0, -new, -1)[:, None, None] / new + taps
    t = (t * cutoff).clamp_(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.tensor(1.0, dtype=t.dtype), t.sin() / t)
    return (sinc * (window * (cutoff / orig))).to(torch.float32), width


def _resample_sinc(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    g = math.gcd(orig_sr, target_sr)
    orig, new = orig_sr // g, target_sr // g
    kernel, width = _sinc_kernel(orig, new)
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, None]
    x = torch.nn.functional.pad(x, (width, width + orig))
    with torch.no_grad():
        y = torch.nn.functional.conv1d(x, kernel, stride=orig)  # [1, new, blocks]
    y = y.transpose(1, 2).reshape(-1)
    n_out = math.ceil(new * audio.shape[0] / orig)
    return y[:n_out].numpy()


RESAMPLERS = ("soxr", "sinc")


def resample(audio: np.ndarray, orig_sr: int, target_sr: int, method: str = "soxr") -> np.ndarray:
    """Band-limited resampling of a mono float32 signal.

    ``method="soxr"``: libsoxr, high quality (HQ). ``method="sinc"``: the
    official frontend's resampler (torchaudio ``Resample`` defaults),
    reimplemented; use it to reproduce the official features exactly.
    Output length: soxr rounds orig_len * ratio, sinc takes its ceiling.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr:
        return audio
    if method == "soxr":
        return soxr.resample(audio, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)
    if method == "sinc":
        return _resample_sinc(audio, orig_sr, target_sr)
    raise ValueError(f"unknown resampler {method!r}; expected one of {RESAMPLERS}")


def load_audio(
    data: AudioSource,
    target_sr: int,
    *,
    min_seconds: float = 0.5,
    max_seconds: float = 30.0,
    min_sample_rate: int | None = None,
    resampler: str = "sinc",
) -> np.ndarray:
    """Decode prompt audio to a mono float32 signal at ``target_sr``.

    Channels are averaged (as the official ``load_wav`` does). The duration
    limits apply to the decoded audio, before resampling; the official
    speech tokenizer refuses more than 30 s. ``min_sample_rate`` (off by
    default) mirrors the official check that refuses to upsample prompts
    recorded below 16 kHz. ``resampler``: see :func:`resample`; the default
    is the official frontend's windowed-sinc filter, so prompt features equal
    the ones the model was trained on (soxr differs in the 7-8 kHz band).
    """
    samples, sample_rate = decode_audio(data, max_seconds)
    if min_sample_rate is not None and sample_rate < min_sample_rate:
        raise AudioError(
            f"audio sample rate {sample_rate} Hz is below the minimum {min_sample_rate} Hz"
        )
    if not np.isfinite(samples).all():
        raise AudioError("audio contains NaN or infinite samples")

    duration = samples.shape[0] / sample_rate
    if duration < min_seconds:
        raise AudioError(
            f"audio is too short: {duration:.2f} s (minimum {min_seconds:g} s)"
        )
    if duration > max_seconds:
        raise _too_long(duration, max_seconds)

    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    return resample(np.ascontiguousarray(mono), sample_rate, target_sr, resampler)


def _frame_rms(audio: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """RMS per frame, frames centred on multiples of ``hop_length``.

    Same framing as librosa.feature.rms(center=True, pad_mode='constant'):
    the signal is zero-padded by frame_length // 2 on both sides, and frame
    ``i`` covers padded samples [i * hop, i * hop + frame_length).
    """
    half = frame_length // 2
    padded = np.pad(audio.astype(np.float32, copy=False), (half, half))
    n_frames = 1 + (padded.shape[0] - frame_length) // hop_length
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_length)[::hop_length][:n_frames]
    power = np.mean(np.square(frames, dtype=np.float32), axis=1, dtype=np.float32)
    return np.sqrt(power)


def trim_silence(
    audio: np.ndarray,
    *,
    top_db: float = PROMPT_TOP_DB,
    frame_length: int = PROMPT_FRAME_LENGTH,
    hop_length: int = PROMPT_HOP_LENGTH,
) -> np.ndarray:
    """Cut leading and trailing silence, like ``librosa.effects.trim``.

    A frame is non-silent when its RMS is within ``top_db`` dB of the
    loudest frame's RMS (amplitudes floored at 1e-5, i.e. -100 dB, as
    librosa's amplitude_to_db does). The kept span runs from the first
    non-silent frame's start (frame * hop) to the last one's end
    ((frame + 1) * hop, capped at the signal length). A signal with no
    non-silent frame comes back empty; an all-zero signal counts as
    entirely non-silent (every frame equals the reference), as in librosa.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"trim_silence expects a 1-D signal, got shape {audio.shape}")
    if audio.shape[0] == 0:
        return audio
    rms = _frame_rms(audio, frame_length, hop_length).astype(np.float64)
    amin = 1e-5
    ref = max(amin, float(rms.max()))
    level_db = 20.0 * np.log10(np.maximum(amin, rms)) - 20.0 * np.log10(ref)
    loud = np.flatnonzero(level_db > -top_db)
    if loud.size == 0:
        return audio[:0]
    start = int(loud[0]) * hop_length
    end = min(audio.shape[0], (int(loud[-1]) + 1) * hop_length)
    return audio[start:end]


def postprocess_prompt(
    audio: np.ndarray,
    sample_rate: int,
    *,
    top_db: float = PROMPT_TOP_DB,
    frame_length: int = PROMPT_FRAME_LENGTH,
    hop_length: int = PROMPT_HOP_LENGTH,
    max_val: float = PROMPT_MAX_VAL,
    tail_seconds: float = PROMPT_TAIL_SECONDS,
) -> np.ndarray:
    """The official web UI's prompt clean-up: trim, limit the peak, pad.

    1. trim leading/trailing silence (:func:`trim_silence`);
    2. if the peak exceeds ``max_val``, scale the whole signal so the peak
       equals ``max_val`` (quieter prompts are left alone);
    3. append ``int(sample_rate * tail_seconds)`` zeros, so the prompt ends
       in a short pause before the generated speech starts.

    Note: the official web UI applies this to the 16 kHz prompt but sizes
    the tail with the model's output rate (24 kHz for CosyVoice2), i.e.
    4800 samples = 0.3 s at 16 kHz. Pass ``tail_seconds=0.3`` with
    ``sample_rate=16000`` to reproduce that exactly.
    """
    trimmed = trim_silence(audio, top_db=top_db, frame_length=frame_length, hop_length=hop_length)
    peak = float(np.abs(trimmed).max()) if trimmed.size else 0.0
    if peak > max_val:
        trimmed = (trimmed / peak * max_val).astype(np.float32)
    tail = np.zeros(int(sample_rate * tail_seconds), dtype=np.float32)
    return np.concatenate([trimmed.astype(np.float32, copy=False), tail])
