"""gunicorn entry point: `gunicorn -k uvicorn.workers.UvicornWorker -w 2 -b 0.0.0.0:8080 wsgi_wrapper:app`.

Configuration is the CONFIG dict below; every key can be overridden by an environment variable
of the same name in upper case (MODEL_DIR=..., PORT=..., DECODE_PROCESS_NUM=...). `port` names the
backend instance (its IPC directory) and should match gunicorn's -b port. The first worker to
import this starts the backend stages once for all workers; the backend stops when the gunicorn
master exits. With --preload the master starts it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIG = {
    "model_dir": "./pretrained_models/CosyVoice2-0.5B",
    "host": "0.0.0.0",
    "port": 8080,
    "load_trt": False,
    "load_jit": False,
    "data_type": "float16",
    "max_total_token_num": 32768,
    "max_req_total_len": 16384,
    "batch_max_tokens": 16384,
    "httpserver_workers": 1,  # gunicorn's -w decides the HTTP workers; this is ignored here
    "encode_process_num": 1,
    "decode_process_num": 1,
    "decode_max_batch_size": 16,
    "running_max_req_size": 1000,
    "router_max_wait_tokens": 8,
    "cache_capacity": 100,
    "zmq_mode": "ipc:///tmp/",
    "mode": [],
    "health_monitor": False,
    "disable_cudagraph": False,
    "graph_max_batch_size": 64,
    "log_stats_interval": 10,
    "disable_log_stats": False,
    "gpu_memory_limit_gb": 0,  # GB for the whole instance per GPU; 0 = no cap (scripts/run.sh: from the env file)
}


def _argv(config: dict) -> list:
    argv = []
    for key, default in config.items():
        value = os.environ.get(key.upper(), default)
        if isinstance(value, list):
            if value:
                argv += [f"--{key}", *value]
            continue
        argv += [f"--{key}", str(value)]
    return argv


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


from light_tts.server.args import parse_args  # noqa: E402
from light_tts.server.api_server import model_name  # noqa: E402
from light_tts.server.backend import ensure_backend  # noqa: E402

args = parse_args(_argv(CONFIG))
endpoints = ensure_backend(args, watch_pid=_gunicorn_master_pid())
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", os.path.join(endpoints.root, "prom"))

from light_tts.server.http.app import create_app  # noqa: E402

app = create_app(args, endpoints, model_name(args.model_dir))
