"""gunicorn takes every server flag from the environment (ServerArgs's mapping), not only the keys of
the old CONFIG dict: settings given only as variables change what the server does."""
import base64
import json
import re
import sys
import time

import httpx
import pytest
from websockets.sync.client import connect

from light_tts.server.args import FIELDS, env_names
from server_util import PROMPT_TEXT, PROMPT_WAV, Server, free_port

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
