"""`python -m light_tts.server.api_server --model_dir DIR --port 8080`: the whole server.

Starts the backend stages (encode, LLM, decode processes), waits until every one is ready, then
serves HTTP with `--httpserver_workers` uvicorn workers that share the backend. SIGTERM or Ctrl-C
stops the HTTP workers, then every stage, and removes the instance's IPC directory.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import Optional

from light_tts.server.args import ServerArgs, parse_args
from light_tts.server.backend import Backend, endpoints_for
from light_tts.server.stage import setup_logging

log = logging.getLogger("lighttts")
ARGS_ENV = "LIGHTTTS_SERVER_ARGS"


def model_name(model_dir: str) -> str:
    """The directory's name; for a hub cache's copy (.../owner--name/snapshots/<revision>, where a
    ModelScope id in --model_dir leads) the model's name."""
    path = os.path.normpath(model_dir)
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "snapshots":
        return os.path.basename(os.path.dirname(parent)).rsplit("--", 1)[-1]
    return os.path.basename(path) or "CosyVoice2-0.5B"


def port_in_use(host: str, port: int) -> Optional[str]:
    """Why the HTTP port cannot be listened on, or None. Checked before the stages load (15 s and
    more), so a port already taken fails at once; uvicorn binds the same way (SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}): another server there?"
    return None


def app_factory():
    """uvicorn worker entry: rebuild the args the launcher validated and build the app."""
    from light_tts.server.http.app import create_app
    args = ServerArgs(**json.loads(os.environ[ARGS_ENV]))
    setup_logging(f"http:{os.getpid()}", args.log_level)
    return create_app(args, endpoints_for(args), model_name(args.model_dir))


def main(argv=None) -> int:
    args = parse_args(argv)
    busy = port_in_use(args.host, args.port)
    if busy:
        print(f"error: {busy}", file=sys.stderr)
        return 2
    setup_logging("api_server", args.log_level)
    log.debug("settings: %s", args.public())
    # The launcher keeps its command line so runbooks' `pkill -f 'python.*api_server'` finds it;
    # only the stage processes take lighttts::<stage> titles.
    backend = Backend(args)
    try:
        backend.start()
        backend.wait_ready(progress=log.info)
    except (RuntimeError, KeyboardInterrupt) as e:
        log.error("%s", e or "interrupted")
        backend.stop()
        return 1
    threading.Thread(target=backend.supervise, name="supervise", daemon=True).start()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(backend.endpoints.root, "prom")
    os.environ[ARGS_ENV] = json.dumps(vars(args))
    import uvicorn

    def _exit(signum, frame):
        raise SystemExit(0)
    # uvicorn catches SIGTERM/SIGINT to shut down gracefully, then re-raises them to the handler that
    # was installed before it: ours, which unwinds to the `finally` that stops the backend.
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    try:
        log.info("serving http://%s:%d with %d HTTP worker(s)", args.host, args.port, args.httpserver_workers)
        uvicorn.run("light_tts.server.api_server:app_factory", factory=True, host=args.host, port=args.port,
                    workers=args.httpserver_workers, log_level=args.log_level, timeout_graceful_shutdown=5,
                    access_log=False)
    finally:
        log.info("stopping the backend")
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
