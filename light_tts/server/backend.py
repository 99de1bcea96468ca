"""Start, watch and stop one instance's stage processes (encode x N, LLM, decode x M).

`api_server` runs a Backend in its own process beside its HTTP workers; gunicorn's
`wsgi_wrapper` starts one detached (`python -m light_tts.server.backend`) the first time any
worker imports it, and that backend exits when the gunicorn master does.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from light_tts.server.args import ServerArgs
from light_tts.server.ipc import Endpoints, StatusTable, pid_alive, stage_health

log = logging.getLogger("lighttts")
BACKEND_ARGS_ENV = "LIGHTTTS_BACKEND_ARGS"


def _target(stage: str) -> tuple[Callable, tuple]:
    kind, _, idx = stage.partition(":")
    if kind == "encode":
        from light_tts.server.encode.process import run_encode_process
        return run_encode_process, (int(idx),)
    if kind == "llm":
        from light_tts.server.llm.process import run_llm_process
        return run_llm_process, ()
    from light_tts.server.decode.process import run_decode_process
    return run_decode_process, (int(idx),)


def endpoints_for(args) -> Endpoints:
    return Endpoints.for_instance(args.zmq_mode, args.port, args.encode_process_num, args.decode_process_num)


class Backend:
    def __init__(self, args):
        self.args = args
        self.endpoints = endpoints_for(args)
        self.ctx = mp.get_context("spawn")
        self.procs: dict[str, mp.Process] = {}
        self._stopping = threading.Event()
        self._created = False
        self._restarts: dict[str, list[float]] = {}

    def start(self) -> None:
        self.endpoints.create()
        self._created = True
        os.makedirs(os.path.join(self.endpoints.root, "prom"), mode=0o700, exist_ok=True)
        for stage in self.endpoints.stages():
            self._spawn(stage)

    def _spawn(self, stage: str) -> None:
        fn, extra = _target(stage)
        p = self.ctx.Process(target=fn, args=(self.args, self.endpoints, *extra), name=f"lighttts::{stage}",
                             daemon=False)
        p.start()
        self.procs[stage] = p

    def wait_ready(self, timeout: float = 900.0, progress: Callable[[str], None] = print,
                   abandon: Callable[[], Optional[str]] = lambda: None) -> None:
        """Block until every stage is ready; raise with the failing stage if one dies first, or with
        abandon()'s reason as soon as it gives one (the process the backend serves is gone)."""
        t0, last = time.time(), 0.0
        while True:
            why = abandon()
            if why:
                raise RuntimeError(why)
            for stage, p in self.procs.items():
                if not p.is_alive():
                    raise RuntimeError(f"stage {stage} exited with code {p.exitcode} while starting "
                                       f"(see its log lines above)")
            health = stage_health(self.endpoints)
            if all(v == "ok" for v in health.values()):
                progress(f"backend ready in {time.time() - t0:.1f} s: {', '.join(health)}")
                return
            if time.time() - t0 > timeout:
                raise RuntimeError(f"backend not ready after {timeout:.0f} s: {health}")
            if time.time() - last >= 5:
                waiting = [s for s, v in health.items() if v != "ok"]
                progress(f"starting... {time.time() - t0:.0f} s, waiting for {', '.join(waiting)}")
                last = time.time()
            time.sleep(0.2)

    def supervise(self) -> None:
        """Watch the stages (in a thread): log a death; restart the stage with --health_monitor."""
        table = StatusTable(self.endpoints.status_path, writable=True)
        stages = self.endpoints.stages()
        while not self._stopping.wait(0.5):
            for stage, p in list(self.procs.items()):
                if p.is_alive() or self._stopping.is_set():
                    continue
                slot = stages.index(stage)
                if table.row(slot)[3] != StatusTable.EXITED:
                    log.error("stage %s died (exit code %s)%s", stage, p.exitcode,
                              "; restarting it" if self.args.health_monitor else
                              "; /healthz reports 503 until the server is restarted (--health_monitor restarts stages)")
                    table.beat(slot, 0, StatusTable.EXITED)
                if self.args.health_monitor and self._may_restart(stage):
                    table.mark_restart(slot)
                    self._spawn(stage)

    def _may_restart(self, stage: str) -> bool:
        """Back off a stage that keeps dying (e.g. out of GPU memory while loading): 1, 2, 4 ... 60 s."""
        now = time.time()
        recent = [t for t in self._restarts.get(stage, []) if now - t < 300]
        if recent and now - recent[-1] < min(60.0, 2.0 ** (len(recent) - 1)):
            return False
        self._restarts[stage] = recent + [now]
        return True

    def stop(self) -> None:
        self._stopping.set()
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        deadline = time.time() + 10
        for p in self.procs.values():
            p.join(max(0.1, deadline - time.time()))
            if p.is_alive():
                p.kill()
                p.join(1)
        if self._created:  # never remove the directory of an instance this one refused to replace
            self.endpoints.remove()


def backend_healthy(endpoints: Endpoints) -> bool:
    return os.path.exists(endpoints.status_path) and all(v == "ok" for v in stage_health(endpoints).values())


def _start_lock(endpoints: Endpoints) -> socket.socket:
    """Held while one process starts (or waits for) the instance's backend: a Linux abstract socket
    named by the instance directory. Binding it is exclusive, and it goes away with its holder, so
    nothing is left in /tmp (a lock file was, after every gunicorn run)."""
    name = "\0lighttts-start-" + hashlib.sha1(endpoints.root.encode()).hexdigest()[:20]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.set_inheritable(False)
    while True:
        try:
            s.bind(name)
            return s
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                s.close()
                raise
            time.sleep(0.1)


def ensure_backend(args, watch_pid: int, timeout: float = 900.0) -> Endpoints:
    """Start a detached backend for this instance unless one is already serving (gunicorn: the first
    worker to arrive starts it, the others wait on the lock and find it running)."""
    endpoints = endpoints_for(args)
    lock = _start_lock(endpoints)
    try:
        proc = None
        if not endpoints.live_pids():  # none running, not even one still loading: start it
            env = dict(os.environ, **{BACKEND_ARGS_ENV: json.dumps(vars(args))})  # not argv: it holds the API key
            proc = subprocess.Popen([sys.executable, "-m", "light_tts.server.backend", "--watch_pid", str(watch_pid)],
                                    env=env, start_new_session=True)
        t0 = time.time()
        while not backend_healthy(endpoints):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the backend exited with code {proc.returncode} while starting")
            if time.time() - t0 > timeout:
                raise RuntimeError(f"the backend was not ready after {timeout:.0f} s")
            time.sleep(0.2)
    finally:
        lock.close()
    return endpoints


def main(argv=None) -> int:
    """Detached backend: run until SIGTERM or until --watch_pid exits."""
    p = argparse.ArgumentParser(description="LightTTS backend stages (started by wsgi_wrapper; the server "
                                            f"arguments arrive as JSON in ${BACKEND_ARGS_ENV})")
    p.add_argument("--watch_pid", type=int, default=0)
    ns = p.parse_args(argv)
    args = ServerArgs(**json.loads(os.environ.pop(BACKEND_ARGS_ENV)))
    from light_tts.server.stage import name_process, setup_logging
    setup_logging("backend", args.log_level)
    log.debug("settings: %s", args.public())
    name_process("backend", args.port)
    backend = Backend(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        def abandon() -> Optional[str]:   # the master died or we were told to stop while loading
            if stop.is_set():
                return "stopped while starting"
            if ns.watch_pid and not pid_alive(ns.watch_pid):
                return f"process {ns.watch_pid} exited while the backend was starting; stopping it"
            return None
        backend.start()
        backend.wait_ready(progress=log.info, abandon=abandon)
        threading.Thread(target=backend.supervise, daemon=True).start()
        while not stop.wait(0.5):
            if ns.watch_pid and not pid_alive(ns.watch_pid):
                log.info("process %d is gone; stopping the backend", ns.watch_pid)
                break
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    finally:
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
