"""What every backend stage process does besides its own loop: name itself, log with its name,
publish heartbeats, follow its parent out, and pick its device."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

from light_tts.server.ipc import HEARTBEAT_SECONDS, Endpoints, StatusTable

log = logging.getLogger("lighttts")


def setup_logging(stage: str, level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), force=True,
                        format=f"%(asctime)s %(levelname)s [{stage}] %(message)s")


def name_process(stage: str) -> None:
    """`ps` shows lighttts::encode:0, lighttts::llm, lighttts::decode:1, ..."""
    try:
        import setproctitle
        setproctitle.setproctitle(f"lighttts::{stage}")
    except ImportError:
        pass


def die_with_parent() -> None:
    """Linux: get SIGTERM when the launcher dies, so no stage outlives its server."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Heartbeat:
    """A daemon thread that stamps this stage's row of the status table."""

    def __init__(self, endpoints: Endpoints, stage: str):
        self.table = StatusTable(endpoints.status_path, writable=True)
        self.slot = endpoints.stages().index(stage)
        self.state = StatusTable.STARTING
        self.table.beat(self.slot, os.getpid(), self.state)
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()

    def ready(self) -> None:
        self.state = StatusTable.READY
        self.table.beat(self.slot, os.getpid(), self.state)

    def _run(self) -> None:
        while True:
            self.table.beat(self.slot, os.getpid(), self.state)
            time.sleep(HEARTBEAT_SECONDS)


def start_stage(endpoints: Endpoints, stage: str, log_level: str) -> Heartbeat:
    die_with_parent()
    name_process(stage)
    setup_logging(stage, log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher handles Ctrl-C and stops us with SIGTERM
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    return Heartbeat(endpoints, stage)


def stage_device(index: int = 0) -> str:
    """'cuda:i % num_gpus' where GPUs exist (respecting CUDA_VISIBLE_DEVICES), else 'cpu'."""
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{index % n}" if n else "cpu"


def stage_dtype(data_type: str, device: str) -> str:
    return data_type if device.startswith("cuda") else "fp32"
