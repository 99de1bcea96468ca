"""gunicorn takes every server flag from the environment (ServerArgs's mapping), not only the keys of
the old CONFIG dict: settings given only as variables change what the server does."""
import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from websockets.sync.client import connect

from light_tts.server.args import FIELDS, env_names
from server_util import PROMPT_TEXT, PROMPT_WAV, ROOT, Server, free_port

pytestmark = pytest.mark.server   # starts server processes: not in the fast tier

PROMPT = open(PROMPT_WAV, "rb").read()


def synth(url, n=10):
    return httpx.post(url + "/inference_zero_shot", timeout=120,
                      data={"prompt_text": PROMPT_TEXT, "tts_text": "Settings from the environment.",
                            "fixed_speech_tokens": str(n)},
                      files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")})


def test_gunicorn_flags_only_from_environment_variables(tiny_model_dir, tmp_path, monkeypatch):
    for name in FIELDS:   # only what this test sets reaches the server
        for var in env_names(name):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("EXTRA_ARGS", raising=False)
    port = free_port()
    settings = {"MODEL_DIR": tiny_model_dir, "PORT": str(port), "ZMQ_MODE": f"ipc://{tmp_path}/",
                "MAX_REQ_TOTAL_LEN": "2048", "BATCH_MAX_TOKENS": "2048", "DATA_TYPE": "float32",
                # under test: the first was a CONFIG key; the other three gunicorn could not set before
                "MAX_TOTAL_TOKEN_NUM": "6144", "MAX_QUEUE_SIZE": "1", "REQUEST_TIMEOUT": "5", "LOG_LEVEL": "debug"}
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    srv = Server([sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "1",
                  "-b", f"127.0.0.1:{port}", "--timeout", "300", "wsgi_wrapper:app"],
                 port, str(tmp_path / "gunicorn.log"))
    try:
        srv.wait_healthy(timeout=240)

        # MAX_TOTAL_TOKEN_NUM: the LLM's KV pool
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        assert re.search(r"^lighttts_llm_kv_total 6144(\.0)?$", metrics, re.M), metrics[-2000:]

        with connect(srv.url.replace("http", "ws") + "/ws/tts", open_timeout=30, max_size=None) as ws:
            ws.send(json.dumps({"type": "start", "prompt_text": PROMPT_TEXT, "max_speech_tokens": 10,
                                "prompt_wav": base64.b64encode(PROMPT).decode()}))
            started = json.loads(ws.recv(timeout=60))
            assert started["type"] == "started", started
            # MAX_QUEUE_SIZE=1: the open utterance is the one request this worker takes
            r = synth(srv.url)
            assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
            assert "limit 1" in r.json()["detail"], r.text
            # REQUEST_TIMEOUT=5: an utterance without text or audio ends with a 504 naming the 5 s (the
            # default would wait 300 s)
            deadline = time.time() + 120
            while True:
                msg = ws.recv(timeout=max(0.1, deadline - time.time()))
                if isinstance(msg, str) and json.loads(msg).get("type") == "error":
                    event = json.loads(msg)
                    break
            assert event["status"] == 504 and "5 s" in event["message"], event

        # the slot is free again (its release is asynchronous: retry a 503 for a while)
        deadline = time.time() + 30
        while (r := synth(srv.url)).status_code == 503 and time.time() < deadline:
            time.sleep(0.5)
        assert r.status_code == 200 and r.content[:4] == b"RIFF", r.text

        # LOG_LEVEL=debug: the backend logs its settings at debug level, with the values set above
        line = re.search(r" DEBUG \[backend\] settings: (.*)$", srv.tail(100000), re.M)
        assert line and "'max_queue_size': 1," in line.group(1) and "'request_timeout': 5.0," in line.group(1), \
            srv.tail()
    finally:
        srv.stop()


# ---- seed 000's gunicorn command, and starts that cannot succeed

GUNICORN = [sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "2", "--timeout", "300"]


def clean_env(monkeypatch, **settings):
    """Only `settings` (and this checkout's PYTHONPATH) configure the server."""
    for name in FIELDS:
        for var in env_names(name):
            monkeypatch.delenv(var, raising=False)
    for var in ("EXTRA_ARGS", "LIGHTTTS_API_KEY", "ALLOW_OPEN"):
        monkeypatch.delenv(var, raising=False)
    for k, v in settings.items():
        monkeypatch.setenv(k, str(v))
    from server_util import server_env
    return server_env()


def titled(port):
    """Live LightTTS processes of the instance on `port` (stages and the gunicorn backend: lighttts::...@port)."""
    from server_util import stage_pids
    return [t for t in stage_pids("lighttts::") if t.split("@")[1:2] == [str(port)]]


def test_seed_000_gunicorn_command_as_written(tiny_model_dir, tmp_path, monkeypatch):
    """Seed 000, 7.3, with its .envrc's FINETURED_COSYVOICE2_MODEL_PATH and no MODEL_DIR: the model
    comes from that variable. Its -b 0.0.0.0 serves other machines, so the server requires the key;
    both logs are written, and after the stop nothing of the instance is left in /tmp (a lock
    file was, after every gunicorn run)."""
    port = free_port()
    clean_env(monkeypatch, FINETURED_COSYVOICE2_MODEL_PATH=tiny_model_dir, PORT=port, LIGHTTTS_API_KEY="k-000",
                    MAX_TOTAL_TOKEN_NUM=8192, MAX_REQ_TOTAL_LEN=2048, BATCH_MAX_TOKENS=2048)
    access, error = tmp_path / "lighttts_access.log", tmp_path / "lighttts_error.log"
    srv = Server(GUNICORN + ["-b", f"0.0.0.0:{port}", "--access-logfile", str(access), "--error-logfile", str(error),
                             "wsgi_wrapper:app"], port, str(tmp_path / "gunicorn.out"))
    try:
        srv.wait_healthy(timeout=240)
        assert httpx.get(srv.url + "/query_tts_model", timeout=10).status_code == 401
        key = {"Authorization": "Bearer k-000"}
        r = httpx.get(srv.url + "/query_tts_model", headers=key, timeout=10)
        assert r.status_code == 200 and r.json()["tts_models"] == ["tiny"], r.text   # FINETURED_... was used
        r = httpx.post(srv.url + "/inference_zero_shot", timeout=120, headers=key,
                       data={"prompt_text": PROMPT_TEXT, "tts_text": "Seed zero.", "fixed_speech_tokens": "10"},
                       files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")})
        assert r.status_code == 200 and r.content[:4] == b"RIFF", r.text
        assert "Booting worker" in error.read_text() and "/inference_zero_shot" in access.read_text()
    finally:
        srv.stop()
    deadline = time.time() + 20   # the backend follows its master out
    while titled(port) and time.time() < deadline:
        time.sleep(0.2)
    assert not titled(port)
    left = [f for f in os.listdir("/tmp") if f.startswith(f"lighttts-{os.getuid()}-{port}")]
    assert not left, left


def run_gunicorn(args, env, cwd, timeout=120):
    t0 = time.time()
    r = subprocess.run(GUNICORN + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return r, time.time() - t0


@pytest.mark.parametrize("case", ["bad_model_dir", "load_trt", "open_bind"])
def test_gunicorn_stops_with_one_line_instead_of_restarting_workers(case, tiny_model_dir, tmp_path, monkeypatch):
    """A start every worker would fail: gunicorn exits non-zero with the reason as one line in its
    error log, and leaves no process. It restarted workers forever (48 in 15 s) for a bad MODEL_DIR,
    and LOAD_TRT=True left a traceback and a backend running after the master."""
    port = free_port()
    settings = {"bad_model_dir": dict(MODEL_DIR=tmp_path / "tinyy"),
                "load_trt": dict(MODEL_DIR=tiny_model_dir, LOAD_TRT="True"),
                "open_bind": dict(MODEL_DIR=tiny_model_dir)}[case]
    expect = {"bad_model_dir": f"--model_dir {tmp_path / 'tinyy'}: not a directory",
              "load_trt": "--load_trt True needs ",
              "open_bind": "gunicorn -b 0.0.0.0 serves other machines without an API key"}[case]
    if case == "load_trt":
        from light_tts.server.api_server import nvidia_gpu_present
        if nvidia_gpu_present() and importlib.util.find_spec("tensorrt"):
            pytest.skip("this machine can run TensorRT")
    env = clean_env(monkeypatch, PORT=port, ZMQ_MODE=f"ipc://{tmp_path}/", **settings)
    bind = ["-b", f"{'0.0.0.0' if case == 'open_bind' else '127.0.0.1'}:{port}"]
    error_log = tmp_path / "error.log"

    # from the repository root gunicorn reads our gunicorn.conf.py: refused in the master, before any fork
    r, took = run_gunicorn(bind + ["--error-logfile", str(error_log), "wsgi_wrapper:app"], env, ROOT)
    log = error_log.read_text()
    assert r.returncode == 2, (r.stderr, log)
    lines = [line for line in log.splitlines() if "LightTTS:" in line]
    assert len(lines) == 1 and expect in lines[0], log
    assert "Traceback" not in log + r.stderr and "Booting worker" not in log, log
    assert took < 60 and not titled(port)

    # gunicorn started elsewhere (no gunicorn.conf.py), with and without --preload: the first worker to
    # fail (or the preloading master) logs the one line and exits with gunicorn's boot-error code,
    # which halts it; the other workers wait for the master's SIGTERM
    for preload in ([], ["--preload"]):
        error_log.unlink()
        r, took = run_gunicorn(bind + ["--chdir", ROOT, "--error-logfile", str(error_log), *preload, "wsgi_wrapper:app"],
                               env, str(tmp_path))
        log = error_log.read_text()
        assert r.returncode == 3, (preload, r.stderr, log)
        lines = [line for line in log.splitlines() if "LightTTS:" in line]
        assert len(lines) == 1 and expect in lines[0], log
        assert "Traceback" not in log + r.stderr and log.count("Booting worker") <= 2, log
        assert took < 60
        deadline = time.time() + 10
        while titled(port) and time.time() < deadline:
            time.sleep(0.2)
        assert not titled(port), titled(port)
