"""What every backend stage process shares: its start (name, log format, heartbeats, following its
parent out, device) and the shape of its loop.

Every stage (encode/process.py, llm/process.py, decode/process.py) reads the same way:

    recv_from_<peer>  PULL socket(s);  send_to_<peer>  PUSH socket(s) (send_to_http: ReplySockets)
    dispatch          a Dispatcher: the (message type -> handle_*) table and the failure rule
    drop_request(rid) the stage's clean-up when one of its requests fails (Dispatcher's hook)
    reply(reply_to, msg)   a message to the HTTP worker that asked
    publish_stats()   the stage's counters for /metrics, when its stats Ticker is due
    run_forever()     the loop
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from typing import Callable, Optional

from light_tts.server.io_struct import ErrorOutput, RequestError
from light_tts.server.ipc import HEARTBEAT_SECONDS, Endpoints, StatusTable

log = logging.getLogger("lighttts")

STATS_SECONDS = 0.5         # how often a stage publishes its counters for /metrics


class Dispatcher:
    """A stage's (message type -> handler) table and the one failure rule of every stage.

    A message of a type not in the table is logged and dropped. When a handler raises, the
    message's request fails and the stage goes on serving: a RequestError answers its status and
    message, anything else is logged and answers 500 "<stage> failed: ...". Failing a request
    calls the stage's `drop(rid)`, which forgets what the stage holds for it and returns the
    reply address it kept (or None); the ErrorOutput goes to the message's reply_to, else to that
    address. A handler of a batch message calls `fail` per row, so a bad row fails only its own
    request."""

    def __init__(self, stage: str, handlers: dict, reply: Callable[[str, object], None],
                 drop: Callable[[str], Optional[str]]):
        self.stage = stage                          # "encode:0", "llm", "decode:1" (ErrorOutput.stage)
        self.handlers = dict(handlers)
        self.reply = reply
        self.drop = drop
        self.errors = 0                             # requests failed (any status)

    def __call__(self, msg) -> None:
        handler = self.handlers.get(type(msg))
        if handler is None:
            log.warning("dropping a message of unexpected type %s", type(msg).__name__)
            return
        try:
            handler(msg)
        except Exception as e:  # a bad message fails its request, never the stage
            rid = getattr(msg, "rid", None)
            if rid is None:     # a batch message failed as a whole: no one request to fail
                self.errors += 1
                log.error("%s failed: %s", type(msg).__name__, e, exc_info=e)
            else:
                self.fail(rid, e, getattr(msg, "reply_to", None))

    def fail(self, rid: str, exc: Exception, reply_to: Optional[str] = None) -> None:
        """Fail request `rid` because of `exc` (the rule above); `reply_to`: where to answer, if known."""
        self.errors += 1
        if isinstance(exc, RequestError):
            status, message = exc.status, str(exc)
        else:
            log.error("request %s failed: %s", rid, exc, exc_info=exc)
            status, message = 500, f"{self.stage.partition(':')[0]} failed: {exc}"
        held = self.drop(rid)
        reply_to = reply_to or held
        if reply_to:
            self.reply(reply_to, ErrorOutput(rid=rid, status=status, message=message, stage=self.stage))


class Ticker:
    """`due()` is true at most once per `seconds` (monotonic clock), the first time at once."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.next = float("-inf")

    def due(self, now: Optional[float] = None) -> bool:
        now = time.monotonic() if now is None else now
        if now < self.next:
            return False
        self.next = now + self.seconds
        return True


def setup_logging(stage: str, level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), force=True,
                        format=f"%(asctime)s %(levelname)s [{stage}] %(message)s")


def process_title(stage: str, port: int = 0) -> str:
    """lighttts::encode:0@8080, lighttts::llm@8080, ...: the instance's port tells two servers on one
    machine apart in `ps` (and in what pkill / pgrep -f match)."""
    return f"lighttts::{stage}" + (f"@{port}" if port else "")


def name_process(stage: str, port: int = 0) -> None:
    """`ps` shows process_title(stage, port)."""
    try:
        import setproctitle
        setproctitle.setproctitle(process_title(stage, port))
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
    name_process(stage, endpoints.port)
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
