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
  instead of an ``assert`` or a decoder traceback;
- every accepted prompt costs bounded time and memory, whatever its header
  says (see "Cost bound" below); torchaudio's ``Resample`` builds one
  filter row per output phase, so an odd rate (16001 Hz: 16000 rows of
  16015 taps) needs gigabytes, and the official code would need them too.

Cost bound (issue 21 item 1). The header is checked before any sample is
decoded: the rate must lie in [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] (8 kHz to
192 kHz), at most MAX_CHANNELS channels, at most ``max_seconds`` long (and
the read stops at that limit, so a header that lies cannot make us decode
more). Channels are averaged block by block, so memory holds one mono copy:
4 bytes per sample, at most 30 s x 192 kHz x 4 B = 23 MB. The sinc
resampler then does at most 1024 multiply-adds per output sample, whatever
the rates, in working memory of a few MB:
- rate pairs whose reduced ratio ``orig/new`` has small terms (all the
  common rates: 8, 11.025, 12, 16, 22.05, 24, 32, 44.1, 48, 88.2, 96,
  176.4, 192 kHz) use the official polyphase kernel, bit for bit as before;
  a kernel is at most KERNEL_MAX_PHASES x KERNEL_MAX_TAPS (4 MiB), and the
  cache of them is bounded in bytes (KERNEL_CACHE_BYTES);
- any other pair (44101 Hz, 16001 Hz, ...) evaluates the same filter per
  output sample over its own 2 x width + 2 taps (at most 148, from 192 kHz
  to 16 kHz), in bounded chunks, and caches nothing.
Measured (one core of the 2-core CI machine, decode + both target rates):
about 20 ms of CPU per second of prompt at odd rates up to 48 kHz, 40 ms
near 192 kHz; the worst accepted prompt (30 s at 191999 Hz) takes 1.2 s
and 64 MB of peak memory. Before, a 3 s prompt at 1601 Hz took
6 s and 1.6 GB, and 4001 or 16001 Hz could not be allocated in 3 GB.

The server takes uploads as bytes: everything here works on bytes as well
as on paths, and never writes temporary files.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections import OrderedDict
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

# What a prompt's header may announce (checked before any sample is decoded). 8 kHz is the lowest
# rate in common use (narrowband telephony; below it most of the speech band is gone, and the
# official frontend refuses anything below 16 kHz); 192 kHz the highest of common studio and
# consumer formats. 8 channels is 7.1 audio, and FLAC's maximum.
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8
DECODE_BLOCK_FRAMES = 1 << 16     # frames read (and downmixed) at a time


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


def check_header(sample_rate: int, channels: int, frames: int, max_seconds: float | None) -> None:
    """Refuse, from the header alone, what would cost more than a prompt may: a rate outside
    [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE], more than MAX_CHANNELS channels, a declared length over
    ``max_seconds``."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"audio sample rate {sample_rate} Hz is outside the accepted range "
                         f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    if channels < 1:
        raise AudioError("audio has no channels")
    if channels > MAX_CHANNELS:
        raise AudioError(f"audio has {channels} channels; at most {MAX_CHANNELS} are accepted")
    if max_seconds is not None and frames > 0 and frames / sample_rate > max_seconds:
        raise _too_long(frames / sample_rate, max_seconds)


def _read_blocks(f: sf.SoundFile, limit: int | None, mono: bool) -> np.ndarray:
    """Read at most ``limit`` frames in blocks; with ``mono`` average the channels block by block
    (each frame's mean is the same as over the whole array), so only one mono copy is held."""
    blocks, total = [], 0
    while limit is None or total < limit:
        want = DECODE_BLOCK_FRAMES if limit is None else min(DECODE_BLOCK_FRAMES, limit - total)
        block = f.read(want, dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            break
        if mono:
            block = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0].copy()
        blocks.append(block)
        total += block.shape[0]
    if not blocks:
        return np.zeros((0,) if mono else (0, f.channels), dtype=np.float32)
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def decode_audio(data: AudioSource, max_seconds: float | None = None, *,
                 mono: bool = False) -> tuple[np.ndarray, int]:
    """Decode to (float32 samples [frames, channels], sample_rate); with ``mono``, [frames], the
    channels averaged.

    Integer PCM is scaled to [-1, 1) the way libsndfile (and so torchaudio's
    soundfile backend) does it: int16 / 32768, int32 / 2**31.
    The header is checked first (:func:`check_header`: rate, channels, and with
    ``max_seconds`` the declared length), so a refused file costs no decoding.
    With ``max_seconds`` the read also stops one frame past the limit, so a
    header that under-declares its length cannot make us decode an hour of
    audio only to reject it.
    """
    source = _as_sound_file_input(data)
    try:
        with sf.SoundFile(source) as f:
            sample_rate = int(f.samplerate)
            check_header(sample_rate, int(f.channels), int(f.frames), max_seconds)
            finite = max_seconds is not None and math.isfinite(max_seconds)
            limit = math.floor(max_seconds * sample_rate) + 1 if finite else None
            samples = _read_blocks(f, limit, mono)
    except AudioError:
        raise
    except Exception as exc:  # libsndfile raises several types; all mean "bad file"
        detail = str(exc).strip() or type(exc).__name__
        raise AudioError(
            "could not decode audio (supported: WAV, FLAC, OGG, MP3): " + detail
        ) from None
    if limit is not None and samples.shape[0] >= limit:
        raise AudioError(f"audio is too long: over {max_seconds:g} s (maximum {max_seconds:g} s)")
    return samples, sample_rate


# The official (torchaudio) windowed-sinc filter: 6 zero crossings of the lower rate each side,
# cut-off at 0.99 x the lower Nyquist.
ZERO_CROSSINGS = 6
ROLLOFF = 0.99
# A polyphase kernel is built (and cached) only while it is small: at most this many output phases
# and taps per phase, i.e. 4 MiB of float32. Every common rate pair fits (the largest, 11025 Hz to
# 16 kHz, is 640 x 455); any other pair takes the per-output path.
KERNEL_MAX_PHASES = 1024
KERNEL_MAX_TAPS = 1024
KERNEL_CACHE_BYTES = 32 << 20     # all cached kernels together
DIRECT_CHUNK_TAPS = 1 << 16       # per-output path: (outputs x taps) evaluated at a time, ~0.5 MiB per buffer


def _filter_params(orig: int, new: int) -> tuple[float, int]:
    """(cut-off in units of the reduced rates, half-width in input samples) of the official filter."""
    cutoff = min(orig, new) * ROLLOFF
    return cutoff, math.ceil(ZERO_CROSSINGS * orig / cutoff)


def _sinc_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase Hann-windowed sinc low-pass kernel, one row per output phase.

    Same construction (and rounding) as torchaudio's default ``Resample``
    (sinc_interp_hann, lowpass_filter_width 6, rolloff 0.99), which the
    official frontend and its training data pipeline use: the cut-off is
    0.99 x the lower Nyquist, the sinc is cut after 6 zero crossings with a
    cos^2 window, built in float64 and stored as float32.
    Rates are already divided by their gcd. Returns (kernel [new, 1, K], width),
    K = orig + 2 * width: its size grows with the ratio's terms, so callers
    build it only within KERNEL_MAX_PHASES x KERNEL_MAX_TAPS.
    """
    zero_crossings = ZERO_CROSSINGS
    cutoff, width = _filter_params(orig, new)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # output phase j sits at -j / new input periods from the tap grid (torchaudio computes -j / new in float32)
    t = torch.arange(0, -new, -1)[:, None, None] / new + taps
    t = (t * cutoff).clamp_(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.tensor(1.0, dtype=t.dtype), t.sin() / t)
    return (sinc * (window * (cutoff / orig))).to(torch.float32), width


class _KernelCache:
    """The polyphase kernels by reduced (orig, new), least recently used first out, bounded in
    bytes (not in entries: one odd rate's kernel could be a thousand common ones)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[tuple[int, int], tuple[torch.Tensor, int]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, orig: int, new: int) -> tuple[torch.Tensor, int]:
        key = (orig, new)
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                return hit
        kernel, width = _sinc_kernel(orig, new)
        size = kernel.numel() * kernel.element_size()
        with self.lock:
            if key not in self.entries and size <= self.max_bytes:
                self.entries[key] = (kernel, width)
                self.bytes += size
                while self.bytes > self.max_bytes:
                    old, _ = self.entries.popitem(last=False)[1]
                    self.bytes -= old.numel() * old.element_size()
        return kernel, width


_kernels = _KernelCache(KERNEL_CACHE_BYTES)


def _resample_polyphase(audio: np.ndarray, orig: int, new: int) -> np.ndarray:
    """The official computation: a strided conv1d with the whole [new, 1, orig + 2 width] kernel."""
    kernel, width = _kernels.get(orig, new)
    x = torch.from_numpy(audio)[None, None]
    x = torch.nn.functional.pad(x, (width, width + orig))
    with torch.no_grad():
        y = torch.nn.functional.conv1d(x, kernel, stride=orig)  # [1, new, blocks]
    y = y.transpose(1, 2).reshape(-1)
    n_out = -(-new * audio.shape[0] // orig)
    return y[:n_out].numpy()


def _resample_direct(audio: np.ndarray, orig: int, new: int) -> np.ndarray:
    """The same filter, evaluated per output sample over its own taps only.

    Output k sits at k * orig / new input samples; with q = floor of that, its taps are the inputs
    q - width .. q + width + 1 (2 width + 2 of them; the kernel is exactly 0 past the 6th zero
    crossing, which is inside that span), and tap r's filter argument is
    t_r = cutoff * ((d + r) / orig - j / new), j = k mod new, d = (j * orig) // new - width, with
    -j / new rounded to float32 first, as torchaudio does, so the kernel values are the polyphase
    kernel's (to float64 rounding). t_r = t_0 + r * cutoff / orig, so sin(pi t_r) and
    cos(pi t_r / 12) come from two angle-addition tables: two sines and two cosines per output,
    not per tap. Work: (2 width + 2) taps per output, in chunks of DIRECT_CHUNK_TAPS; nothing
    cached, nothing that grows with the ratio's terms.
    """
    cutoff, width = _filter_params(orig, new)
    n = audio.shape[0]
    n_out = -(-new * n // orig)
    out = np.empty(n_out, dtype=np.float32)
    if n_out == 0:
        return out
    taps = 2 * width + 2
    padded = np.concatenate([np.zeros(width, np.float32), audio, np.zeros(width + 2, np.float32)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, taps)   # windows[q]: output k's inputs
    zc, delta, scale = ZERO_CROSSINGS, cutoff / orig, cutoff / orig
    step = math.pi * delta * np.arange(taps)
    # sin(pi t_r) = sin(pi t_0) cos(step_r) + cos(pi t_0) sin(step_r), pre-scaled by scale / pi
    sin_c, sin_s = np.cos(step) * (scale / math.pi), np.sin(step) * (scale / math.pi)
    # cos(pi t_r / (2 zc)) = cos(h_0) cos(step_r / (2 zc)) - sin(h_0) sin(step_r / (2 zc))
    win_c, win_s = np.cos(step / (2 * zc)), np.sin(step / (2 * zc))
    dt = delta * np.arange(taps)
    rows = max(1, DIRECT_CHUNK_TAPS // taps)
    t_buf, k_buf, w_buf, u_buf = (np.empty((rows, taps)) for _ in range(4))
    for start in range(0, n_out, rows):
        c = min(rows, n_out - start)
        t, kern, w, u = t_buf[:c], k_buf[:c], w_buf[:c], u_buf[:c]
        k = np.arange(start, start + c, dtype=np.int64)
        j = k % new
        q = (k * orig) // new
        d = (j * orig) // new - width
        phase = (-j.astype(np.float32) / np.float32(new)).astype(np.float64)
        t0 = (phase + d / orig) * cutoff
        p0 = math.pi * t0
        np.add(t0[:, None], dt, out=t)
        np.multiply(np.sin(p0)[:, None], sin_c, out=kern)
        np.multiply(np.cos(p0)[:, None], sin_s, out=u)
        kern += u                                    # sin(pi t) * scale / pi
        h0 = p0 / (2 * zc)
        np.multiply(np.cos(h0)[:, None], win_c, out=w)
        np.multiply(np.sin(h0)[:, None], win_s, out=u)
        w -= u
        w *= w                                       # the cos^2 window
        kern *= w
        np.abs(t, out=u)
        np.copyto(t, 1.0, where=u < 1e-7)            # avoid 0 / 0: sinc(0) = 1 is set below
        kern /= t                                    # sin(pi t) / (pi t) * window * scale
        np.copyto(kern, scale, where=u < 1e-7)       # window(0) = 1
        np.copyto(kern, 0.0, where=u >= zc)          # past the last zero crossing
        out[start:start + c] = np.einsum("ij,ij->i", windows[q], kern.astype(np.float32))
    return out


def _resample_sinc(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    g = math.gcd(orig_sr, target_sr)
    orig, new = orig_sr // g, target_sr // g
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    _, width = _filter_params(orig, new)
    if new <= KERNEL_MAX_PHASES and orig + 2 * width <= KERNEL_MAX_TAPS:
        return _resample_polyphase(audio, orig, new)
    return _resample_direct(audio, orig, new)


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
    mono, sample_rate = decode_audio(data, max_seconds, mono=True)
    if min_sample_rate is not None and sample_rate < min_sample_rate:
        raise AudioError(
            f"audio sample rate {sample_rate} Hz is below the minimum {min_sample_rate} Hz"
        )
    if not np.isfinite(mono).all():
        raise AudioError("audio contains NaN or infinite samples")

    duration = mono.shape[0] / sample_rate
    if duration < min_seconds:
        raise AudioError(
            f"audio is too short: {duration:.2f} s (minimum {min_seconds:g} s)"
        )
    if duration > max_seconds:
        raise _too_long(duration, max_seconds)
    return resample(mono, sample_rate, target_sr, resampler)


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
