"""Prompt audio at any sample rate costs bounded time and memory (issue 21 item 1).

torchaudio's Resample (and our copy of it) builds one filter row per output phase of the rates
divided by their gcd: 16001 Hz -> 16 kHz is 16000 rows of 16015 taps, gigabytes for a 10 KB upload.
Now the header's rate must be in 8 kHz..192 kHz (else 400 before any sample is decoded), the common
rates keep the official kernel bit for bit, and any other rate evaluates the same filter per output
sample over its own taps (light_tts/frontend/audio.py, "Cost bound").

The fast tests measure the resampler in a child process (peak RSS from /proc/<pid>/status VmHWM,
CPU time from getrusage) under an address-space cap, so a regression fails instead of taking the
machine's memory. The server test sends odd-rate prompts through a real server and reads the encode
stage's own VmHWM and CPU time.
"""
import base64
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from light_tts.frontend import audio as A
from light_tts.frontend.audio import AudioError, load_audio, resample

from server_util import PROMPT_TEXT, Server, server_env, stage_pids

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
COMMON_RATES = [8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000]
ODD_RATES = [8001, 11024, 16001, 22051, 24001, 44101, 47999, 96001, 191999]


@pytest.fixture(autouse=True)
def address_space_cap(request):
    """In-process tests resample under a cap of 2 GiB over what the process has mapped, so a
    resampler that regresses to rate-sized kernels fails (torch or numpy cannot allocate) instead
    of taking the machine's memory. Not for the server test: its server would inherit the cap."""
    if "rate_server" in request.fixturenames:
        yield
        return
    import resource
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped + (2 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def wav_bytes(x: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def speech_at(rate: int, seconds: float = 3.0) -> np.ndarray:
    """The fixture speech (16 kHz), resampled by soxr (independent of the code under test) to `rate`."""
    x, sr = sf.read(os.path.join(FIXTURES, "prompt_en.wav"), dtype="float32")
    x = x[: int(sr * seconds)]
    return soxr.resample(x, sr, rate, quality="HQ").astype(np.float32)


# ---------------------------------------------------------------- the result


def previous_sinc_resample(audio, orig_sr, target_sr):
    """The resampler as it was before the fix (a frozen copy): the whole polyphase kernel, conv1d."""
    g = math.gcd(orig_sr, target_sr)
    orig, new = orig_sr // g, target_sr // g
    cutoff = min(orig, new) * 0.99
    width = math.ceil(6 * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1)[:, None, None] / new + taps
    t = (t * cutoff).clamp_(-6, 6)
    window = torch.cos(t * math.pi / 6 / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.tensor(1.0, dtype=t.dtype), t.sin() / t)
    kernel = (sinc * (window * (cutoff / orig))).to(torch.float32)
    x = torch.nn.functional.pad(torch.from_numpy(audio)[None, None], (width, width + orig))
    y = torch.nn.functional.conv1d(x, kernel, stride=orig).transpose(1, 2).reshape(-1)
    return y[: math.ceil(new * audio.shape[0] / orig)].numpy()


@pytest.mark.parametrize("rate", COMMON_RATES)
def test_common_rates_are_resampled_as_before_bit_for_bit(rate):
    x = (np.random.default_rng(rate).standard_normal(int(rate * 0.7)) * 0.3).astype(np.float32)
    for target in (16000, 24000):
        expected = x if rate == target else previous_sinc_resample(x, rate, target)
        np.testing.assert_array_equal(resample(x, rate, target, "sinc"), expected)


def official_formula(x, orig_sr, new_sr):
    """Loop over output samples of torchaudio's Resample formula, in float64, with its one rounding
    that matters at odd rates: the output phase -j / new is computed in float32."""
    g = math.gcd(orig_sr, new_sr)
    o, w = orig_sr // g, new_sr // g
    c = 0.99 * min(o, w)
    half = math.ceil(6 * o / c)
    y = np.zeros(math.ceil(len(x) * w / o))
    for m in range(len(y)):
        block, j = divmod(m, w)
        phase = float(np.float32(-j) / np.float32(w))
        lo, hi = max(0, m * o // w - half - 1), min(len(x), m * o // w + half + 2)
        n = np.arange(lo, hi)
        t = np.clip(c * ((n - block * o) / o + phase), -6, 6)
        y[m] = np.sum(x[lo:hi] * np.sinc(t) * np.cos(np.pi * t / 12) ** 2) * c / o
    return y


@pytest.mark.parametrize("rate", [8001, 16001, 24001, 44101, 191999])
@pytest.mark.parametrize("target", [16000, 24000])
def test_odd_rates_follow_the_official_formula(rate, target):
    x = (np.random.default_rng(7).standard_normal(1200) * 0.3).astype(np.float32)
    y = resample(x, rate, target, "sinc")
    ref = official_formula(x.astype(np.float64), rate, target)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=5e-6)   # float32 kernel and products


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 192000])
def test_the_per_output_path_equals_the_kernel_path(rate):
    """Where both are possible, the two evaluations of the filter agree to float32 rounding."""
    x = (np.random.default_rng(3).standard_normal(rate // 2) * 0.3).astype(np.float32)
    for target in (16000, 24000):
        g = math.gcd(rate, target)
        a = A._resample_polyphase(x, rate // g, target // g)
        b = A._resample_direct(x, rate // g, target // g)
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-7)


def test_odd_rate_keeps_a_tone():
    x = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(44101 * 2) / 44101)).astype(np.float32)
    y = resample(x, 44101, 16000, "sinc")
    assert len(y) == math.ceil(2 * 44101 * 16000 / 44101)
    t = np.arange(len(y)) / 16000
    np.testing.assert_allclose(y[500:-500], (0.5 * np.sin(2 * np.pi * 1000 * t))[500:-500], atol=2e-3)


# ---------------------------------------------------------------- the cost

COST_PROBE = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    from light_tts.frontend.audio import resample

    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

    def reset_peak():   # VmHWM := VmRSS (Linux >= 4.0); without it the growth is a lower bound
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    resample(np.zeros(4000, np.float32), 44100, 16000, "sinc")   # first-use costs: torch, numpy
    resample(np.zeros(4000, np.float32), 16000, 24000, "sinc")
    out = []
    for rate, seconds in json.loads(sys.argv[1]):
        x = (np.random.default_rng(0).standard_normal(int(rate * seconds)) * 0.1).astype(np.float32)
        for target in (16000, 24000):
            reset_peak()
            base = status_mb("VmRSS")
            cpu = time.process_time()
            try:
                y = resample(x, rate, target, "sinc")
                error = None
            except (MemoryError, RuntimeError) as e:   # the address-space cap
                error = type(e).__name__
            out.append(dict(rate=rate, target=target, seconds=seconds, cpu=time.process_time() - cpu,
                            peak_mb=status_mb("VmHWM") - base, error=error))
    print(json.dumps(out))
""")


def run_cost_probe(cases, cap_gb=3.0):
    """Resample in a child process under an address-space cap: [{rate, target, cpu, peak_mb, error}]."""
    def limit():
        import resource
        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    env = dict(server_env(), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", COST_PROBE, json.dumps(cases)], capture_output=True, text=True,
                       timeout=300, preexec_fn=limit, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_odd_rates_cost_little_time_and_memory():
    """3 s prompts at odd rates (the issue's 1601..2003 Hz took 5-7 s and 2-3 GB; 4001 and 16001 Hz
    could not be allocated under 4 GB), and 5 s near the top of the range: a few MB and well under a
    second of CPU each (measured: ~0.03 s per 3 s prompt and target, ~0.2 s for 5 s at 191999 Hz)."""
    cases = [[r, 3.0] for r in (1601, 2003, 4001, 16001, 44101, 8001, 22051, 96001)] + [[191999, 5.0]]
    for row in run_cost_probe(cases):
        assert row["error"] is None, row
        assert row["peak_mb"] < 64, row
        assert row["cpu"] < 2.0, row


def test_kernel_cache_is_bounded_in_bytes():
    cache = A._KernelCache(max_bytes=3 << 19)          # 1.5 MiB
    for orig, new in [(441, 640), (441, 320), (147, 160), (441, 160), (3, 2), (441, 640)]:
        cache.get(orig, new)
        assert cache.bytes == sum(k.numel() * 4 for k, _ in cache.entries.values()) <= 3 << 19
    # 11025 -> 16 kHz (1.1 MiB) is pushed out by 22050 -> 16 kHz; back, it pushes that out in turn
    assert list(cache.entries) == [(147, 160), (441, 160), (3, 2), (441, 640)]
    small = A._KernelCache(max_bytes=1000)
    kernel, width = small.get(441, 640)                # larger than the whole cache: used, not kept
    assert kernel.shape == (640, 1, 441 + 2 * width) and small.bytes == 0 and not small.entries
    # the process-wide cache: its bound, and no kernel at all for a rate with large terms
    before = dict(A._kernels.entries)
    resample(np.zeros(2000, np.float32), 16001, 16000, "sinc")
    assert set(A._kernels.entries) - set(before) == set()
    assert A._kernels.bytes <= A.KERNEL_CACHE_BYTES
    for orig, new in A._kernels.entries:
        assert new <= A.KERNEL_MAX_PHASES and orig + 2 * A._filter_params(orig, new)[1] <= A.KERNEL_MAX_TAPS


# ---------------------------------------------------------------- what the header may say


@pytest.mark.parametrize("rate", [1601, 2003, 4001, 7999, 192001, 384000, 1_000_000])
def test_rates_outside_the_range_are_refused_from_the_header(rate):
    data = wav_bytes(np.zeros(int(min(rate, 200_000) * 0.6), np.float32), rate)
    with pytest.raises(AudioError, match=f"sample rate {rate} Hz is outside the accepted range 8000..192000 Hz"):
        load_audio(data, 16000)


def test_the_range_ends_are_accepted():
    for rate in (8000, 192000):
        x = speech_at(rate, 1.0)
        assert len(load_audio(wav_bytes(x, rate), 16000)) == 16000


def test_too_many_channels_are_refused():
    data = wav_bytes(np.zeros((8000, 9), np.float32), 16000)
    with pytest.raises(AudioError, match="9 channels; at most 8"):
        load_audio(data, 16000)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (8000, 8)).astype(np.float32)
    np.testing.assert_array_equal(load_audio(wav_bytes(x, 16000, "FLOAT"), 16000), x.mean(axis=1, dtype=np.float32))


def test_block_downmix_equals_the_whole_array_mean():
    """Channels are averaged a block at a time (one mono copy in memory), with the same values."""
    frames = A.DECODE_BLOCK_FRAMES * 2 + 123
    x = np.random.default_rng(1).uniform(-0.9, 0.9, (frames, 3)).astype(np.float32)
    data = wav_bytes(x, 16000, "FLOAT")
    mono, rate = A.decode_audio(data, mono=True)
    assert rate == 16000
    np.testing.assert_array_equal(mono, x.mean(axis=1, dtype=np.float32))
    full, _ = A.decode_audio(data)
    np.testing.assert_array_equal(full, x)


# ---------------------------------------------------------------- through the real server

SERVER_RATES = [1601, 2003, 4001, 7999, 8001, 16001, 22051, 44101, 48001, 96001, 191999, 192001]
ENCODE_CPU_BOUND = 3.0      # s of encode-stage CPU per request (measured: well under 0.5 s)
ENCODE_PEAK_BOUND = 256     # MB the encode stage's peak RSS may grow over all requests
REQUEST_WALL_BOUND = 60.0   # s per request, on a loaded 2-core machine


def _status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def encode_peak_mb(pid: int) -> float:
    return int(_status(pid)["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


@pytest.fixture(scope="module")
def rate_server(tiny_model_dir, tmp_path_factory):
    with Server.api_server(tiny_model_dir, tmp_path_factory.mktemp("rates")) as srv:
        yield srv


@pytest.mark.server
def test_odd_rate_prompts_through_the_server(rate_server):
    url = rate_server.url
    encode = [pid for title, pid in stage_pids("lighttts::encode").items()
              if title.split("@")[1:2] == [str(rate_server.port)]]
    assert len(encode) == 1, stage_pids()
    pid = encode[0]

    def send(path, rate, seconds=3.0, as_json=False, **fields):
        x = speech_at(rate, seconds) if 8000 <= rate <= 192000 else np.zeros(int(rate * seconds), np.float32)
        data = wav_bytes(x, rate)
        fields = {"prompt_text": PROMPT_TEXT, "tts_text": "Odd rates.", "fixed_speech_tokens": "8", **fields}
        cpu, t0 = cpu_seconds(pid), time.time()
        if as_json:
            r = httpx.post(url + path, json={**fields, "prompt_wav": base64.b64encode(data).decode()}, timeout=120)
        else:
            r = httpx.post(url + path, data=fields, files={"prompt_wav": ("p.wav", data, "audio/wav")}, timeout=120)
        return r, cpu_seconds(pid) - cpu, time.time() - t0

    r, _, _ = send("/inference_zero_shot", 16000)       # warm-up: first-use costs of every stage
    assert r.status_code == 200, r.text
    peak0 = encode_peak_mb(pid)
    report = []
    for i, rate in enumerate(SERVER_RATES):
        path, extra = [("/inference_zero_shot", {}), ("/inference_cross_lingual", {}),
                       ("/voices", {"voice_id": f"odd{rate}"})][i % 3]
        r, cpu, wall = send(path, rate, as_json=(i % 2 == 1 and path != "/voices"), **extra)
        grown = encode_peak_mb(pid) - peak0
        report.append((path, rate, r.status_code, round(cpu, 2), round(wall, 2), round(grown)))
        assert cpu < ENCODE_CPU_BOUND, report
        assert wall < REQUEST_WALL_BOUND, report
        assert grown < ENCODE_PEAK_BOUND, report
        if 8000 <= rate <= 192000:
            assert r.status_code == 200, (rate, r.status_code, r.text[:300])
        else:
            assert r.status_code == 400, (rate, r.status_code, r.content[:100])
            assert f"sample rate {rate} Hz is outside the accepted range" in r.json()["detail"]
    print("path, rate, status, encode cpu s, wall s, encode peak growth MB:", *report, sep="\n  ")
    assert httpx.get(url + "/healthz").status_code == 200
