"""Where one server instance's processes meet: socket addresses and the stage status table.

An instance owns a private directory, `<zmq_mode path>/lighttts-<uid>-<port>/` (mode 0700), so two
instances on one host never collide and other users cannot connect. It holds one ipc socket per
receiving process and `status.bin`, a small memory-mapped table in which every stage process
publishes its pid and a heartbeat; any HTTP worker (uvicorn or gunicorn, parent or not) reads it
to answer /healthz and to fail requests of a dead stage fast.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import zmq

from light_tts.server.args import MAX_HTTP_WORKERS

HEARTBEAT_SECONDS = 0.5
DEAD_AFTER_SECONDS = 2.0


@dataclass(frozen=True)
class Endpoints:
    root: str
    encode_num: int
    decode_num: int
    port: int = 0     # the instance's HTTP port: its processes' titles carry it (0: none)

    @classmethod
    def for_instance(cls, zmq_mode: str, port: int, encode_num: int, decode_num: int) -> "Endpoints":
        base = zmq_mode[len("ipc://"):] if zmq_mode.startswith("ipc://") else "/tmp/"
        return cls(os.path.join(base or "/tmp/", f"lighttts-{os.getuid()}-{port}"), encode_num, decode_num, port)

    def _addr(self, name: str) -> str:
        return f"ipc://{os.path.join(self.root, name)}.ipc"

    def encode(self, i: int) -> str:
        return self._addr(f"encode{i}")

    @property
    def llm(self) -> str:
        return self._addr("llm")

    def decode(self, i: int) -> str:
        return self._addr(f"decode{i}")

    def http(self, worker: str) -> str:
        return self._addr(f"http-{worker}")

    @property
    def status_path(self) -> str:
        return os.path.join(self.root, "status.bin")

    def stages(self) -> list[str]:
        return ([f"encode:{i}" for i in range(self.encode_num)] + ["llm"]
                + [f"decode:{i}" for i in range(self.decode_num)])

    def live_pids(self) -> list[int]:
        """Stage pids of a backend that still runs in this directory (empty if none)."""
        try:
            table = StatusTable(self.status_path)
        except (OSError, ValueError):
            return []
        return [pid for pid in (int(row[0]) for row in table.table) if pid_alive(pid)]

    def create(self) -> None:
        """Make the private directory afresh (the launcher does this once). Refuses while another
        backend's stages still run in it: wiping it would cut that instance off its sockets."""
        running = self.live_pids()
        if running:
            raise RuntimeError(f"another LightTTS instance is running in {self.root} (stage pids "
                               f"{', '.join(map(str, running))}); stop it or use another --port")
        if os.path.lexists(self.root) and (os.path.islink(self.root) or os.lstat(self.root).st_uid != os.getuid()):
            raise RuntimeError(f"{self.root} exists and is not a directory of this user; remove it or use another --port")
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root, mode=0o700)
        os.chmod(self.root, 0o700)  # makedirs' mode is masked by the umask
        StatusTable.create(self.status_path, len(self.stages()))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def bind_pull(ctx: zmq.Context, addr: str) -> zmq.Socket:
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(addr)
    return s


def connect_push(ctx: zmq.Context, addr: str) -> zmq.Socket:
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a slow peer; backpressure is admission's job
    s.connect(addr)
    return s


class StatusTable:
    """Per stage: pid, last heartbeat (time.time()), restarts, state (0 starting, 1 ready, 2 exited)."""
    FIELDS = 4
    STARTING, READY, EXITED = 0.0, 1.0, 2.0

    def __init__(self, path: str, writable: bool = False):
        self.path = path
        self.table = np.memmap(path, dtype=np.float64, mode="r+" if writable else "r")
        self.table = self.table.reshape(-1, self.FIELDS)

    @classmethod
    def create(cls, path: str, n: int) -> None:
        np.zeros((n, cls.FIELDS), dtype=np.float64).tofile(path)
        os.chmod(path, 0o600)

    def beat(self, slot: int, pid: int, state: float) -> None:
        row = self.table[slot]
        row[0], row[1], row[3] = pid, time.time(), state

    def mark_restart(self, slot: int) -> None:
        self.table[slot, 2] += 1

    def row(self, slot: int) -> tuple[int, float, int, float]:
        pid, beat, restarts, state = self.table[slot].tolist()
        return int(pid), beat, int(restarts), state


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) still answers kill(0): look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stage_health(endpoints: Endpoints, table: "StatusTable | None" = None) -> dict[str, str]:
    """{stage: 'ok' | 'starting' | reason} read from the status table."""
    try:
        table = table or StatusTable(endpoints.status_path)
    except (OSError, ValueError):
        return {s: "backend not running" for s in endpoints.stages()}
    now = time.time()
    out = {}
    for slot, name in enumerate(endpoints.stages()):
        pid, beat, _, state = table.row(slot)
        if state == StatusTable.EXITED or (pid and not pid_alive(pid)):
            out[name] = "process exited"
        elif state == StatusTable.STARTING:
            out[name] = "starting"
        elif now - beat > DEAD_AFTER_SECONDS:
            out[name] = f"no heartbeat for {now - beat:.1f} s"
        else:
            out[name] = "ok"
    return out


def write_stats(endpoints: Endpoints, stage: str, stats: dict) -> None:
    """Publish a stage's counters for /metrics (atomic replace of a small JSON file)."""
    import json
    path = os.path.join(endpoints.root, f"stats-{stage.replace(':', '')}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, path)
    except OSError:
        pass  # the directory is gone: the instance is shutting down


def read_stats(endpoints: Endpoints) -> dict[str, dict]:
    import json
    out = {}
    for stage in endpoints.stages():
        try:
            with open(os.path.join(endpoints.root, f"stats-{stage.replace(':', '')}.json")) as f:
                out[stage] = json.load(f)
        except (OSError, ValueError):
            pass
    return out


def worker_tag() -> str:
    """An HTTP worker's tag, unique in the instance: its pid in hex, then 6 random hex digits."""
    return f"{os.getpid():x}{secrets.token_hex(3)}"


def worker_alive(addr: str) -> bool:
    """Whether the HTTP worker behind reply address `addr` (Endpoints.http) may still be there:
    its ipc file exists and the pid in its tag is alive (a killed worker leaves its file behind)."""
    if addr.startswith("ipc://") and not os.path.exists(addr[len("ipc://"):]):
        return False
    m = re.search(r"http-([0-9a-f]{7,})(?:\.ipc)?$", addr)
    return m is None or pid_alive(int(m.group(1)[:-6], 16))


class ReplySockets:
    """PUSH sockets to the HTTP workers named by requests' `reply_to`, opened on first use.

    HTTP workers come and go (gunicorn recycles them, a crashed one is replaced), so whenever a new
    address shows up the sockets of workers that are gone (worker_alive) are closed (LINGER 0: what
    was queued for a dead worker is dropped, not kept forever), and at most MAX_OPEN stay open, the
    least recently used closed first (a worker that is still there is reconnected on its next
    reply; --httpserver_workers is at most MAX_OPEN, so that takes a stale tag)."""
    MAX_OPEN = MAX_HTTP_WORKERS

    def __init__(self, ctx: zmq.Context):
        self.ctx = ctx
        self._socks: OrderedDict[str, zmq.Socket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._socks)

    def send(self, addr: str, msg) -> None:
        from light_tts.server.io_struct import sock_send
        sock = self._socks.get(addr)
        if sock is None:
            self._prune()
            sock = self._socks[addr] = connect_push(self.ctx, addr)
        else:
            self._socks.move_to_end(addr)
        sock_send(sock, msg)

    def close(self) -> None:
        while self._socks:
            self._socks.popitem()[1].close()

    def _prune(self) -> None:
        for addr in [a for a in self._socks if not worker_alive(a)]:
            self._socks.pop(addr).close()
        while len(self._socks) >= self.MAX_OPEN:
            self._socks.popitem(last=False)[1].close()
