"""Prompt audio loading, resampling and the official prompt clean-up.

References are independent of the code under test: the stdlib ``wave``
module for PCM WAV, Debian's sox / lame / espeak-ng for other formats and
real speech, and direct loop re-derivations of the resampling and trimming
formulas. The speech fixture (tests/fixtures/speech_16k.wav, 16 kHz int16,
3.3 s) was spoken by espeak-ng and converted by sox; speech_16k.mp3 was
encoded from it by lame.
"""

import io
import math
import os
import shutil
import subprocess
import wave

import numpy as np
import pytest
import soundfile as sf

from light_tts.frontend.audio import (
    AudioError,
    load_audio,
    postprocess_prompt,
    resample,
    trim_silence,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SPEECH_WAV = os.path.join(FIXTURES, "speech_16k.wav")
SPEECH_MP3 = os.path.join(FIXTURES, "speech_16k.mp3")


def require_tool(name):
    """Skip on a developer machine without the tool; fail in CI, which installs it."""
    if shutil.which(name) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (apt-get install espeak-ng sox lame)")
        pytest.skip(f"{name} is not installed")


def read_wav_stdlib(path):
    """Independent PCM16 WAV reader: (float samples [frames, channels], rate)."""
    with wave.open(path, "rb") as w:
        assert w.getsampwidth() == 2
        raw = w.readframes(w.getnframes())
        data = np.frombuffer(raw, dtype="<i2").reshape(-1, w.getnchannels())
        return data.astype(np.float64) / 32768.0, w.getframerate()


def write_wav_stdlib(path, int16_frames, rate):
    frames = np.asarray(int16_frames, dtype="<i2")
    if frames.ndim == 1:
        frames = frames[:, None]
    with wave.open(path, "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())


def best_lag_correlation(a, b, max_lag):
    """Normalised correlation of b with a at the best lag in [-max_lag, max_lag]."""
    n = len(a) + len(b)
    xc = np.fft.irfft(np.fft.rfft(a, n) * np.conj(np.fft.rfft(b, n)), n)
    lags = np.r_[np.arange(0, max_lag + 1), np.arange(-max_lag, 0)]
    lag = int(lags[np.argmax(xc[lags])])  # a[i + lag] ~ b[i]
    x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
    m = min(len(x), len(y))
    x, y = x[:m], y[:m]
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))


def tone(freq, rate, seconds, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1.0 / rate)[spec.argmax()]


# ---------------------------------------------------------------- decoding


def test_wav_int16_matches_stdlib_reader():
    ref, rate = read_wav_stdlib(SPEECH_WAV)
    assert rate == 16000
    out = load_audio(SPEECH_WAV, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_array_equal(out, ref[:, 0].astype(np.float32))
    # bytes and file objects decode the same
    data = open(SPEECH_WAV, "rb").read()
    np.testing.assert_array_equal(load_audio(data, 16000), out)
    np.testing.assert_array_equal(load_audio(io.BytesIO(data), 16000), out)
    np.testing.assert_array_equal(load_audio(bytearray(data), 16000), out)


def test_stereo_is_downmixed_by_mean(tmp_path):
    rng = np.random.default_rng(0)
    left = rng.integers(-20000, 20000, 12000)
    right = (tone(440, 16000, 0.75) * 20000).astype(np.int64)
    path = str(tmp_path / "stereo.wav")
    write_wav_stdlib(path, np.stack([left, right], axis=1), 16000)
    out = load_audio(path, 16000)
    expect = (left / 32768.0 + right / 32768.0) / 2.0
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-7)


def test_float_wav_is_read_unscaled(tmp_path):
    x = tone(300, 16000, 1.0, amp=0.9)
    path = str(tmp_path / "float.wav")
    sf.write(path, x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path, 16000), x)


def test_mp3_fixture_decodes_to_the_speech():
    ref, _ = read_wav_stdlib(SPEECH_WAV)
    out = load_audio(SPEECH_MP3, 16000)
    np.testing.assert_array_equal(load_audio(open(SPEECH_MP3, "rb").read(), 16000), out)  # uploads are bytes
    assert abs(len(out) - len(ref)) < 2500  # encoder delay / padding only
    # lossy but the same speech: high correlation at the right alignment
    assert best_lag_correlation(ref[:, 0], out.astype(np.float64), 1200) > 0.9


def test_formats_converted_by_sox(tmp_path):
    require_tool("sox")
    ref, _ = read_wav_stdlib(SPEECH_WAV)
    ref = ref[:, 0]
    flac = str(tmp_path / "s.flac")
    ogg = str(tmp_path / "s.ogg")
    subprocess.run(["sox", SPEECH_WAV, flac], check=True)
    subprocess.run(["sox", SPEECH_WAV, ogg], check=True)
    # FLAC is lossless: bit exact
    np.testing.assert_array_equal(load_audio(flac, 16000), ref.astype(np.float32))
    # Vorbis is lossy
    out = load_audio(open(ogg, "rb").read(), 16000)
    assert abs(len(out) - len(ref)) < 2000
    assert best_lag_correlation(ref, out.astype(np.float64), 600) > 0.9


def test_mp3_made_by_lame_from_resampled_stereo(tmp_path):
    require_tool("sox")
    require_tool("lame")
    wav44 = str(tmp_path / "s44.wav")
    mp3 = str(tmp_path / "s44.mp3")
    subprocess.run(["sox", "-R", SPEECH_WAV, "-r", "44100", "-c", "2", wav44], check=True)
    subprocess.run(["lame", "--quiet", "-b", "128", wav44, mp3], check=True)
    ref, _ = read_wav_stdlib(SPEECH_WAV)
    out = load_audio(mp3, 16000)
    assert abs(len(out) - len(ref)) < 2500
    assert best_lag_correlation(ref[:, 0], out.astype(np.float64), 1200) > 0.9


def test_spoken_prompt_from_espeak(tmp_path):
    require_tool("espeak-ng")
    path = str(tmp_path / "prompt.wav")
    subprocess.run(["espeak-ng", "-w", path, "This is a test prompt."], check=True)
    rate = sf.info(path).samplerate  # espeak-ng speaks at 22050 Hz
    out16 = load_audio(path, 16000)
    out24 = load_audio(path, 24000)
    frames = sf.info(path).frames
    assert abs(len(out16) - round(frames * 16000 / rate)) <= 1
    assert abs(len(out24) - round(frames * 24000 / rate)) <= 1
    assert 0.05 < np.abs(out16).max() <= 1.01


# ---------------------------------------------------------------- resampling


def test_resample_keeps_tone_frequency_and_level():
    x = tone(1000, 44100, 2.0)
    y = resample(x, 44100, 16000)
    assert y.dtype == np.float32 and len(y) == 32000
    core = y[1000:-1000]
    assert abs(peak_frequency(core, 16000) - 1000) < 1.0
    assert abs(np.sqrt(np.mean(core ** 2)) - 0.5 / math.sqrt(2)) < 0.005
    # against the exact continuous-time tone at the output instants
    t = np.arange(len(y)) / 16000
    np.testing.assert_allclose(core, (0.5 * np.sin(2 * np.pi * 1000 * t))[1000:-1000], atol=2e-3)


@pytest.mark.parametrize("freq", [8500.0, 9000.0, 12000.0, 20000.0])
def test_resample_suppresses_tones_above_new_nyquist(freq):
    x = tone(freq, 44100, 1.0)
    y = resample(x, 44100, 16000)[500:-500]
    level_db = 20 * np.log10(np.sqrt(np.mean(y ** 2)) / (0.5 / math.sqrt(2)) + 1e-20)
    assert level_db < -40.0, f"{freq} Hz leaks at {level_db:.1f} dB"


def test_load_audio_resamples_44k_stereo(tmp_path):
    x = (tone(700, 44100, 1.0) * 16000).astype(np.int64)
    path = str(tmp_path / "a.wav")
    write_wav_stdlib(path, np.stack([x, x], axis=1), 44100)
    y = load_audio(path, 16000)
    assert len(y) == 16000
    assert abs(peak_frequency(y[500:-500], 16000) - 700) < 1.5


def sinc_resample_reference(x, orig_sr, new_sr, zeros=6, rolloff=0.99):
    """Direct loop over output samples of the Hann-windowed sinc formula.

    y[m] = (c / o) * sum_n x[n] * sinc(t) * cos^2(pi t / (2 zeros)),
    t = c * (n / o - m / w), |t| <= zeros, c = rolloff * min(o, w),
    with o, w the rates divided by their gcd (torchaudio's default Resample).
    """
    g = math.gcd(orig_sr, new_sr)
    o, w = orig_sr // g, new_sr // g
    c = rolloff * min(o, w)
    n_out = math.ceil(len(x) * w / o)
    y = np.zeros(n_out)
    for m in range(n_out):
        centre = m * o / w
        lo = max(0, int(math.floor(centre - zeros * o / c)) - 1)
        hi = min(len(x), int(math.ceil(centre + zeros * o / c)) + 2)
        n = np.arange(lo, hi)
        t = c * (n / o - m / w)
        t = np.clip(t, -zeros, zeros)
        window = np.cos(np.pi * t / zeros / 2) ** 2
        y[m] = np.sum(x[lo:hi] * np.sinc(t) * window) * c / o
    return y


@pytest.mark.parametrize("rates", [(44100, 16000), (16000, 24000), (24000, 16000), (48000, 24000)])
def test_sinc_resampler_matches_direct_formula(rates):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(900) * 0.3).astype(np.float32)
    y = resample(x, *rates, method="sinc")
    ref = sinc_resample_reference(x.astype(np.float64), *rates)
    assert y.shape == ref.shape
    # float32 kernel and accumulation over up to 475 taps
    np.testing.assert_allclose(y, ref, atol=5e-6)


def test_unknown_resampler_is_rejected():
    with pytest.raises(ValueError, match="unknown resampler"):
        resample(np.zeros(100, np.float32), 16000, 24000, method="linear")


# ---------------------------------------------------------------- bad audio


def _error(data, **kw):
    with pytest.raises(AudioError) as info:
        load_audio(data, 16000, **kw)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_empty_bytes():
    assert "empty" in _error(b"")


def test_random_bytes_are_undecodable():
    rng = np.random.default_rng(2)
    msg = _error(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    assert msg.startswith("could not decode audio")


def test_truncated_header_is_undecodable():
    data = open(SPEECH_WAV, "rb").read()[:30]
    assert _error(data).startswith("could not decode audio")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    x = tone(200, 16000, 1.0)
    x[5000] = bad
    path = str(tmp_path / "bad.wav")
    sf.write(path, x, 16000, subtype="FLOAT")
    assert "NaN or infinite" in _error(path)


def test_too_short_reports_duration_and_limit(tmp_path):
    path = str(tmp_path / "short.wav")
    write_wav_stdlib(path, np.zeros(4800, dtype=np.int16), 16000)  # 0.3 s
    msg = _error(path)
    assert "too short" in msg and "0.30 s" in msg and "0.5 s" in msg
    # the limit is configurable
    assert len(load_audio(path, 16000, min_seconds=0.2)) == 4800


def test_too_long_reports_duration_and_limit(tmp_path):
    path = str(tmp_path / "long.wav")
    write_wav_stdlib(path, np.zeros(8000 * 31, dtype=np.int16), 8000)  # 31 s
    msg = _error(path)
    assert "too long" in msg and "31.00 s" in msg and "30 s" in msg
    msg = _error(path, max_seconds=12.5)
    assert "31.00 s" in msg and "12.5 s" in msg


def test_empty_wav_counts_as_too_short(tmp_path):
    path = str(tmp_path / "empty.wav")
    write_wav_stdlib(path, np.zeros(0, dtype=np.int16), 16000)
    assert "too short: 0.00 s" in _error(path)


def test_missing_file_and_low_rate():
    assert "not found" in _error("/nonexistent/prompt.wav")
    with pytest.raises(AudioError, match="8000 Hz is below the minimum 16000 Hz"):
        buf = io.BytesIO()
        sf.write(buf, np.zeros(8000, np.float32), 8000, format="WAV")
        load_audio(buf.getvalue(), 16000, min_sample_rate=16000)


# ---------------------------------------------------------------- prompt clean-up


def trim_reference(x, top_db, frame_length, hop_length):
    """Frame-by-frame loop version of librosa.effects.trim (centred frames)."""
    half = frame_length // 2
    padded = np.concatenate([np.zeros(half), x.astype(np.float64), np.zeros(half)])
    n_frames = 1 + (len(padded) - frame_length) // hop_length
    rms = []
    for i in range(n_frames):
        frame = padded[i * hop_length: i * hop_length + frame_length]
        rms.append(math.sqrt(sum(v * v for v in frame) / frame_length))
    ref = max(max(rms), 1e-5)
    loud = [i for i, r in enumerate(rms) if 20 * math.log10(max(r, 1e-5) / ref) > -top_db]
    if not loud:
        return x[:0]
    return x[loud[0] * hop_length: min(len(x), (loud[-1] + 1) * hop_length)]


def test_trim_matches_loop_reference_on_speech():
    speech = load_audio(SPEECH_WAV, 16000)[:20000]
    rng = np.random.default_rng(3)
    cases = [
        speech,
        np.concatenate([np.zeros(7000), speech, np.zeros(3001)]).astype(np.float32),
        np.concatenate([rng.normal(0, 3e-4, 5000), speech, rng.normal(0, 3e-4, 4000)]).astype(np.float32),
        np.concatenate([rng.normal(0, 2e-2, 5000), speech, rng.normal(0, 2e-2, 4000)]).astype(np.float32),
    ]
    for x in cases:
        ours = trim_silence(x)
        ref = trim_reference(x, 60.0, 440, 220)
        assert len(ours) == len(ref)
        np.testing.assert_array_equal(ours, ref)


def test_trim_removes_padding_around_speech():
    speech = load_audio(SPEECH_WAV, 16000)
    padded = np.concatenate([np.zeros(16000), speech, np.zeros(8000)]).astype(np.float32)
    out = trim_silence(padded)
    alone = trim_silence(speech)  # the fixture's own quiet tail is trimmed too
    assert 0.8 * len(speech) < len(alone) <= len(speech)
    # the padding goes: what is kept differs from the unpadded trim by less than a frame
    assert abs(len(out) - len(alone)) < 440
    assert np.count_nonzero(out) >= np.count_nonzero(alone)


def test_trim_edge_cases():
    zeros = np.zeros(5000, np.float32)
    np.testing.assert_array_equal(trim_silence(zeros), zeros)  # librosa keeps all-zero input
    assert trim_silence(np.zeros(0, np.float32)).shape == (0,)
    with pytest.raises(ValueError):
        trim_silence(np.zeros((2, 100), np.float32))


def test_postprocess_peak_limit_and_tail():
    speech = load_audio(SPEECH_WAV, 16000)
    loud = np.concatenate([np.zeros(4000), speech / np.abs(speech).max() * 0.99]).astype(np.float32)
    out = postprocess_prompt(loud, 16000)
    trimmed = trim_silence(loud)
    tail = int(16000 * 0.2)
    assert len(out) == len(trimmed) + tail
    assert np.all(out[-tail:] == 0)
    assert abs(np.abs(out).max() - 0.8) < 1e-6
    np.testing.assert_allclose(out[:-tail], trimmed / np.abs(trimmed).max() * 0.8, atol=1e-7)
    # a quiet prompt is not amplified
    quiet = (speech * 0.1).astype(np.float32)
    out = postprocess_prompt(quiet, 24000, tail_seconds=0.3)
    assert len(out) == len(trim_silence(quiet)) + 7200
    np.testing.assert_array_equal(out[: len(trim_silence(quiet))], trim_silence(quiet))
