"""What LightTTS's clients share: Prometheus text, WAV/PCM checks, a server subprocess started and
waited for. Used by scripts/ (monitor, verify_deployment, soak, ws_client), scripts/bench/ and
tests/server_util.py.

Standard library plus light_tts.audio_out (numpy) only: no torch, no HTTP client library, so the
operator's tools that import this stay light."""
from __future__ import annotations

import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

from light_tts.audio_out import SAMPLE_RATE, wav_header

# the folder that holds this light_tts package: what a server subprocess needs on PYTHONPATH
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAV_HEADER_BYTES = len(wav_header(0))  # a non-streamed body is this header, then the PCM


# ---- numbers -----------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """q in [0, 1], linear between the closest ranks; nan for no values (the load tests share it)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---- Prometheus text -----------------------------------------------------------------------------------

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict, float]]]:
    """{sample name: [(labels, value)]} from the text exposition format; lines it cannot read are skipped."""
    out: dict = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            if "{" in line:
                name, rest = line.split("{", 1)
                labels_txt, value = rest.rsplit("}", 1)
                labels = dict(_LABEL.findall(labels_txt))
            else:
                name, value = line.split(None, 1)
                labels = {}
            sample = (labels, float(value.split()[0]))
        except (ValueError, IndexError):
            continue
        out.setdefault(name.strip(), []).append(sample)
    return out


def metric_values(metrics: dict, name: str) -> list[float]:
    """Every sample's value of `name`, whatever its labels."""
    return [v for _, v in metrics.get(name, [])]


def metric_total(metrics: dict, name: str, pred=lambda labels: True) -> float:
    """Sum of the samples of `name` whose labels pass `pred`."""
    return sum(v for labels, v in metrics.get(name, []) if pred(labels))


def metric_first(metrics: dict, name: str) -> float | None:
    vals = metrics.get(name)
    return vals[0][1] if vals else None


def histogram_buckets(metrics: dict, name: str) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count)] of histogram `name`, sorted by bound."""
    out = []
    for labels, v in metrics.get(name + "_bucket", []):
        le = labels.get("le")
        if le is not None:
            out.append((math.inf if le in ("+Inf", "Inf") else float(le), v))
    return sorted(out)


# ---- audio ---------------------------------------------------------------------------------------------

class WavError(ValueError):
    """A body that is not the server's WAV; the message names what is wrong."""


def pcm_seconds(nbytes: int) -> float:
    """Seconds of the server's audio (int16 mono at SAMPLE_RATE) in nbytes of PCM."""
    return nbytes / 2 / SAMPLE_RATE


def parse_wav(body: bytes) -> dict:
    """Walk the RIFF chunks of a whole WAV file: {rate, channels, bits, bytes (of data), seconds}.
    Raises WavError unless it is PCM16 mono at SAMPLE_RATE with sizes that agree with the file."""
    if len(body) < 12 or body[:4] != b"RIFF" or body[8:12] != b"WAVE":
        raise WavError(f"not a WAV file (starts with {body[:12]!r}, {len(body)} bytes)")
    riff_size = struct.unpack("<I", body[4:8])[0]
    if riff_size + 8 != len(body):
        raise WavError(f"RIFF size {riff_size + 8} != file size {len(body)}")
    pos, fmt, data = 12, None, None
    while pos + 8 <= len(body):
        cid, size = body[pos:pos + 4], struct.unpack("<I", body[pos + 4:pos + 8])[0]
        if pos + 8 + size > len(body):
            raise WavError(f"chunk {cid!r} of {size} bytes runs past the end of the file")
        if cid == b"fmt ":
            if size < 16:
                raise WavError(f"fmt chunk of {size} bytes")
            fmt = struct.unpack("<HHIIHH", body[pos + 8:pos + 24])
        elif cid == b"data":
            data = size
        pos += 8 + size + (size & 1)
    if fmt is None or data is None:
        raise WavError("no fmt or no data chunk")
    tag, channels, rate, byte_rate, align, bits = fmt
    if tag != 1 or bits != 16:
        raise WavError(f"expected PCM 16-bit, got format {tag} with {bits} bits")
    if rate != SAMPLE_RATE or channels != 1:
        raise WavError(f"expected {SAMPLE_RATE} Hz mono, got {rate} Hz x {channels} channels")
    if byte_rate != rate * channels * bits // 8 or align != channels * bits // 8:
        raise WavError(f"inconsistent header: byte rate {byte_rate}, block align {align}")
    if data % align:
        raise WavError(f"data chunk of {data} bytes is not whole samples")
    return {"rate": rate, "channels": channels, "bits": bits, "bytes": data, "seconds": data / byte_rate}


def write_wav(path: str, pcm: bytes) -> None:
    """The server's PCM as a WAV file (the header the server itself writes)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(wav_header(len(pcm)) + pcm)


# ---- a server subprocess -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(src: str = PACKAGE_PARENT) -> dict:
    """This environment with the checkout `src` first on PYTHONPATH, unbuffered, one OpenMP thread
    unless set (a CPU server's processes would otherwise each take every core)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def api_server_cmd(model_dir: str, port: int, zmq_dir: str, *extra: str) -> list[str]:
    """`python -m light_tts.server.api_server` on loopback, its sockets under zmq_dir (private per server)."""
    return [sys.executable, "-m", "light_tts.server.api_server", "--model_dir", model_dir, "--port", str(port),
            "--zmq_mode", f"ipc://{zmq_dir.rstrip('/')}/", *extra]


def process_table() -> list[tuple[int, list[str], list[str]]]:
    """[(pid, /proc/<pid>/stat fields after the name, argv)] of every process that is not a zombie.
    Stat fields: 0 state, 1 parent, 2 process group, 3 session."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile
            continue
        if fields and fields[0] != "Z":
            out.append((int(p), fields, argv))
    return out


# loopback polls must not go through a proxy from the environment
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with _DIRECT.open(url.rstrip("/") + "/healthz", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ServerProcess:
    """A server subprocess in its own session (so a stop reaches every stage process); `url` once
    healthy. Its output goes to `log_path`."""

    def __init__(self, cmd: list, port: int, log_path: str, cwd: str = PACKAGE_PARENT, env: dict | None = None):
        self.port, self.log_path = port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=server_env() if env is None else env, cwd=cwd, start_new_session=True)

    def wait_healthy(self, timeout: float = 180.0) -> "ServerProcess":
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            if is_healthy(self.url):
                return self
            time.sleep(0.3)
        raise TimeoutError(f"server not healthy after {timeout:g} s:\n{self.tail()}")

    def __enter__(self) -> "ServerProcess":
        """`with ...:` healthy inside, stopped after (also when it never got healthy)."""
        try:
            return self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self, n: int = 60) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        """`sig` to the server, then SIGKILL to its whole session after `timeout`; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode
