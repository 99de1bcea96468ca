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
from typing import Optional, Sequence

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


# ---- start-up checks: what this machine and the listening address allow, one line each, before any
# stage loads (api_server; gunicorn: gunicorn.conf.py in the master, wsgi_wrapper.py in a worker)
TRT_UNVERIFIED = ("the TensorRT path is not verified by this project's tests (TensorRT cannot be installed on its "
                  "test machines)")
LOOPBACK_HOSTS = ("localhost", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether listening on `host` reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a name other than localhost, or '' / '*': every interface


def nvidia_gpu_present() -> bool:
    """An NVIDIA GPU this process may use, by the driver's files (no torch import: this runs before the
    stages, in well under a second)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        if os.listdir("/proc/driver/nvidia/gpus"):
            return True
    except OSError:
        pass
    return any(n[len("nvidia"):].isdigit() for n in os.listdir("/dev") if n.startswith("nvidia"))


def _load_trt_error(args: ServerArgs) -> Optional[str]:
    if not args.load_trt:
        return None
    import importlib.util
    off = "start with --load_trt False (LOAD_TRT=False; CUDA graphs and the fused flow estimator need no TensorRT)"
    if not nvidia_gpu_present():
        return f"--load_trt True needs an NVIDIA GPU and this machine has none: {off}; {TRT_UNVERIFIED}"
    if importlib.util.find_spec("tensorrt") is None:
        return (f"--load_trt True needs NVIDIA's tensorrt package, which is not installed: {off}, or pip install "
                f"tensorrt-cu12 ({TRT_UNVERIFIED})")
    return None


def open_bind_error(args: ServerArgs, hosts: Sequence[str], how: str = "--host") -> Optional[str]:
    """A start that would serve other machines without a key: refused unless --allow_open."""
    exposed = [h for h in hosts if not is_loopback(h)]
    if not exposed or args.api_key or args.allow_open:
        return None
    return (f"{how} {exposed[0]} serves other machines without an API key: set LIGHTTTS_API_KEY=<key> (clients send "
            f"'Authorization: Bearer <key>'), or listen on 127.0.0.1 behind nginx, or allow it with --allow_open "
            f"(ALLOW_OPEN=true)")


def startup_errors(args: ServerArgs, hosts: Optional[Sequence[str]] = None, how: str = "--host") -> list[str]:
    """What stops a start on this machine, one line each, checked before any stage loads: --load_trt
    without a GPU or without TensorRT, and a non-loopback address without a key (`hosts`: the
    addresses listened on, --host by default; gunicorn's -b under gunicorn)."""
    errors = [_load_trt_error(args), open_bind_error(args, [args.host] if hosts is None else hosts, how)]
    return [e for e in errors if e]


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
    # what this machine and address allow, and the port: one line each, before any stage loads
    errors = startup_errors(args)
    busy = port_in_use(args.host, args.port)
    if errors or busy:
        print("".join(f"error: {e}\n" for e in errors + ([busy] if busy else [])), end="", file=sys.stderr)
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
