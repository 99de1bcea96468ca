"""Start and stop real server processes for tests (tiny model, CPU, loopback)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PROMPT_WAV = os.path.join(FIXTURES, "prompt_en.wav")
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog."
SMALL_LIMITS = ["--max_total_token_num", "8192", "--max_req_total_len", "2048", "--batch_max_tokens", "2048"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Server:
    """A server subprocess; `url` once healthy. Its output goes to `log_path`."""

    def __init__(self, cmd: list, port: int, log_path: str, cwd: str = ROOT):
        self.port, self.log_path = port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=server_env(), cwd=cwd,
                                     start_new_session=True)

    @classmethod
    def api_server(cls, model_dir: str, tmp_path, *extra: str) -> "Server":
        port = free_port()
        cmd = [sys.executable, "-m", "light_tts.server.api_server", "--model_dir", model_dir, "--port", str(port),
               "--zmq_mode", f"ipc://{tmp_path}/", *SMALL_LIMITS, *extra]
        return cls(cmd, port, str(tmp_path / f"server-{port}.log"))

    def wait_healthy(self, timeout: float = 180.0) -> "Server":
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.tail()}")

    def __enter__(self) -> "Server":
        """`with Server.api_server(...) as srv:` - healthy inside, stopped after (also when it never got healthy)."""
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
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def stage_pids(pattern: str = "lighttts::") -> dict[str, int]:
    """{process title: pid} of every live process whose title starts with `pattern`."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if title.startswith(pattern):
            out[f"{title}@{pid}"] = int(pid)
    return out


def live_processes(field: int, value: int) -> list[int]:
    """Non-zombie pids whose /proc/<pid>/stat field (after the name) equals `value`:
    field 2 is the process group, field 3 the session."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[field]) == value:
            out.append(int(p))
    return out


def descendants(pid: int) -> list[int]:
    """Live processes in the session `pid` leads (servers start in their own session)."""
    return [p for p in live_processes(3, pid) if p != pid]


def wav_info(body: bytes) -> tuple[int, int, int, int]:
    """(sample rate, channels, bits, data bytes) from a canonical 44-byte WAV header."""
    import struct
    assert body[:4] == b"RIFF" and body[8:12] == b"WAVE", body[:16]
    _, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[20:36])
    assert body[36:40] == b"data"
    return rate, channels, bits, struct.unpack("<I", body[40:44])[0]
