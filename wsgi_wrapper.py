"""gunicorn entry point: `gunicorn -k uvicorn.workers.UvicornWorker -w 2 -b 0.0.0.0:8080 wsgi_wrapper:app`.

Configuration is the environment: every api_server flag is the variable of its name in upper case
(MODEL_DIR=..., PORT=..., DECODE_PROCESS_NUM=2, REQUEST_TIMEOUT=30, LOAD_TRT=true, MODE="triton_int8kv"),
plus EXTRA_ARGS for flags in command-line form; unset ones keep ServerArgs's defaults
(light_tts/server/args.py; `python -m light_tts.server.args --list` lists them). MODEL_DIR falls
back to FINETURED_COSYVOICE2_MODEL_PATH, then <repo>/pretrained_models/CosyVoice2-0.5B. PORT names
the backend instance (its IPC directory) and should match gunicorn's -b port; gunicorn's -b and -w
decide the address and the HTTP workers (HOST and HTTPSERVER_WORKERS have no effect here).

The first worker to import this starts the backend stages once for all workers; the backend stops
when the gunicorn master exits. With --preload the master starts it. Settings the server refuses
stop the boot with one line each (gunicorn: "Worker failed to boot").
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from light_tts.server.api_server import model_name  # noqa: E402
from light_tts.server.args import args_from_env  # noqa: E402
from light_tts.server.backend import ensure_backend  # noqa: E402


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


args = args_from_env()
endpoints = ensure_backend(args, watch_pid=_gunicorn_master_pid())
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", os.path.join(endpoints.root, "prom"))

from light_tts.server.http.app import create_app  # noqa: E402

app = create_app(args, endpoints, model_name(args.model_dir))
