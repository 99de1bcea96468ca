"""Start and stop real server processes for tests (tiny model, CPU, loopback)."""
from __future__ import annotations

import os

from light_tts.tools.client_util import ServerProcess, api_server_cmd, free_port, parse_wav, process_table
from light_tts.tools.client_util import server_env as _server_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PROMPT_WAV = os.path.join(FIXTURES, "prompt_en.wav")
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog."
SMALL_LIMITS = ["--max_total_token_num", "8192", "--max_req_total_len", "2048", "--batch_max_tokens", "2048"]


def server_env() -> dict:
    """The environment of a process run from this checkout (tests/ and scripts/ subprocesses)."""
    return _server_env(ROOT)


class Server(ServerProcess):
    """A server subprocess started from this checkout (light_tts.tools.client_util.ServerProcess)."""

    def __init__(self, cmd: list, port: int, log_path: str, cwd: str = ROOT):
        super().__init__(cmd, port, log_path, cwd=cwd, env=server_env())

    @classmethod
    def api_server(cls, model_dir: str, tmp_path, *extra: str) -> "Server":
        port = free_port()
        cmd = api_server_cmd(model_dir, port, str(tmp_path), *SMALL_LIMITS, *extra)
        return cls(cmd, port, str(tmp_path / f"server-{port}.log"))


def stage_pids(pattern: str = "lighttts::") -> dict[str, int]:
    """{process title@pid: pid} of every live process whose title starts with `pattern`."""
    return {f"{argv[0]}@{pid}": pid for pid, _, argv in process_table() if argv[0].startswith(pattern)}


def live_processes(field: int, value: int) -> list[int]:
    """Live pids whose /proc/<pid>/stat field (after the name) equals `value`:
    field 2 is the process group, field 3 the session."""
    return [pid for pid, fields, _ in process_table() if int(fields[field]) == value]


def descendants(pid: int) -> list[int]:
    """Live processes in the session `pid` leads (servers start in their own session)."""
    return [p for p in live_processes(3, pid) if p != pid]


def wav_info(body: bytes) -> tuple[int, int, int, int]:
    """(sample rate, channels, bits, data bytes) of a whole WAV body; WavError if it is not the server's."""
    info = parse_wav(body)
    return info["rate"], info["channels"], info["bits"], info["bytes"]
