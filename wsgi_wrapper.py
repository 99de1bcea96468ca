"""gunicorn entry point, run from the repository root:
`PORT=8080 gunicorn -k uvicorn.workers.UvicornWorker -w 2 -b 127.0.0.1:8080 --timeout 300 wsgi_wrapper:app`.

Configuration is the environment: every api_server flag is the variable of its name in upper case
(MODEL_DIR=..., PORT=..., DECODE_PROCESS_NUM=2, REQUEST_TIMEOUT=30, LOAD_TRT=true, MODE="triton_int8kv"),
plus EXTRA_ARGS for flags in command-line form; unset ones keep ServerArgs's defaults
(light_tts/server/args.py; `python -m light_tts.server.args --list` lists them). MODEL_DIR falls
back to FINETURED_COSYVOICE2_MODEL_PATH (seed 000's .envrc), then <repo>/pretrained_models/CosyVoice2-0.5B.
PORT names the backend instance (its IPC directory) and should match gunicorn's -b port; gunicorn's
-b and -w decide the address and the HTTP workers (HOST and HTTPSERVER_WORKERS have no effect here).
A -b other than loopback (0.0.0.0, a LAN address) needs LIGHTTTS_API_KEY (clients send
`Authorization: Bearer <key>`), or ALLOW_OPEN=true to serve without a key.

The first worker to import this starts the backend stages once for all workers; the backend stops
when the gunicorn master exits. With --preload the master starts it.

What stops a start (settings the server refuses, --load_trt on a machine that cannot run it, an
exposed -b without a key, a backend that fails while starting) is one line in gunicorn's error log
and gunicorn exits non-zero, instead of restarting workers forever: gunicorn.conf.py, which
gunicorn reads from the directory it starts in, checks in the master before any worker forks
(exit code 2). Without it, the first worker to fail here (or a --preload master) logs the line and
exits with gunicorn's boot-error code 3, which halts the master.
"""
import logging
import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from light_tts.server.api_server import startup_errors  # noqa: E402
from light_tts.server.args import ConfigError, args_from_env  # noqa: E402

# gunicorn's Arbiter.WORKER_BOOT_ERROR: a worker exiting with it makes the master halt ("Worker failed
# to boot") instead of forking another; a --preload master exits with it as it is
BOOT_ERROR = 3
# gunicorn's error log (--error-logfile); outside gunicorn, logging's last resort prints to stderr
error_log = logging.getLogger("gunicorn.error")


def gunicorn_cfg():
    """gunicorn's settings when gunicorn is importing this module (a worker, or the master under
    --preload), else None: the nearest caller that is a gunicorn object holding its config."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if obj is not None and type(obj).__module__.startswith("gunicorn.") and hasattr(obj, "cfg"):
            return obj.cfg
        frame = frame.f_back
    return None


def bind_hosts(cfg) -> list:
    """The hosts gunicorn listens on (-b); unix sockets and inherited fds are local."""
    return [a[0] for a in cfg.address if isinstance(a, tuple)]


def boot_errors(cfg) -> tuple:
    """(ServerArgs, []) or (None or ServerArgs, the lines that stop the boot)."""
    try:
        args = args_from_env()
    except ConfigError as e:
        return None, str(e).splitlines()
    return args, startup_errors(args, bind_hosts(cfg) if cfg is not None else [], how="gunicorn -b")


def refuse(lines) -> None:
    """Log why and exit with BOOT_ERROR; in a worker, only the first of the master's workers does.
    The others wait for the master's SIGTERM and exit 0: one line in the log, and gunicorn (27)
    fails with a traceback of its own when two workers exit with 3 at once."""
    master = _gunicorn_master_pid()
    if master != os.getpid():
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            first.bind(f"\0lighttts-refused-{master}")   # held until this worker exits
        except OSError:   # another worker refused first: the master is halting
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                signal.signal(sig, lambda *_: os._exit(0))
            time.sleep(30)
            sys.exit(BOOT_ERROR)
    for line in lines:
        error_log.error("LightTTS: %s", line)
    if master != os.getpid():
        time.sleep(0.5)   # hold the name while the other workers reach this point
    sys.exit(BOOT_ERROR)


def _gunicorn_master_pid() -> int:
    """The process whose exit stops the backend: the gunicorn master."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            if b"gunicorn" in f.read():
                return ppid  # we are a worker
    except OSError:
        pass
    return os.getpid()  # --preload: the master itself imports us


args, errors = boot_errors(gunicorn_cfg())
if errors:
    refuse(errors)

from light_tts.server.api_server import model_name  # noqa: E402
from light_tts.server.backend import ensure_backend  # noqa: E402

try:
    endpoints = ensure_backend(args, watch_pid=_gunicorn_master_pid())
except RuntimeError as e:   # the backend's own lines (which stage, why) are above, on stderr
    refuse([f"{e} (its log lines are on gunicorn's stderr)"])
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", os.path.join(endpoints.root, "prom"))

from light_tts.server.http.app import create_app  # noqa: E402

app = create_app(args, endpoints, model_name(args.model_dir))
