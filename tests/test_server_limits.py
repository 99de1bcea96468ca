"""Access control and limits of the real server: API key, upload cap while reading, request
timeout (504), bounded admission (503 with Retry-After)."""
import concurrent.futures
import json
import time

import httpx
import pytest

from server_util import PROMPT_TEXT, PROMPT_WAV, Server

pytestmark = pytest.mark.server   # starts server processes: not in the fast tier

PROMPT = open(PROMPT_WAV, "rb").read()
KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    with Server.api_server(tiny_model_dir, tmp, "--api_key", "s3cret", "--max_upload_bytes", "150000",
                           "--request_timeout", "6", "--max_queue_size", "2", "--max_req_total_len", "8192",
                           "--batch_max_tokens", "8192", "--max_total_token_num", "16384") as srv:
        post(srv.url)  # warm-up: first-use imports and caches
        yield srv


def post(url, n=20, headers=KEY, files=None, **data):
    return httpx.post(url + "/inference_zero_shot", headers=headers, timeout=60,
                      data={"prompt_text": PROMPT_TEXT, "tts_text": "Limits.", "fixed_speech_tokens": str(n), **data},
                      files=files or {"prompt_wav": ("p.wav", PROMPT, "audio/wav")})


def test_api_key(server):
    assert httpx.get(server.url + "/healthz").status_code == 200          # health needs no key
    r = post(server.url, headers={})
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert post(server.url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert post(server.url).status_code == 200


def test_upload_cap_with_and_without_content_length(server):
    big = PROMPT + b"\0" * 100_000
    r = post(server.url, files={"prompt_wav": ("p.wav", big, "audio/wav")})
    assert r.status_code == 413 and "150000" in r.json()["detail"]

    def chunks():  # chunked transfer: no Content-Length, the cap applies while reading
        for i in range(0, 400_000, 10_000):
            yield b"x" * 10_000
    r = httpx.post(server.url + "/inference_zero_shot", headers={**KEY, "content-type": "application/json"},
                   content=chunks(), timeout=60)
    assert r.status_code == 413, r.text
    assert post(server.url).status_code == 200  # and it keeps serving


def test_timeout_is_504_and_aborts(server):
    t = time.time()
    r = post(server.url, n=7000)  # far more work than 6 s on a CPU
    assert r.status_code == 504 and "timed out" in r.json()["detail"]
    assert time.time() - t < 15


def test_admission_is_bounded(server):
    def long_stream():
        with httpx.stream("POST", server.url + "/inference_zero_shot", headers=KEY, timeout=60,
                          data={"prompt_text": PROMPT_TEXT, "tts_text": "Hold the queue.", "stream": "true",
                                "fixed_speech_tokens": "7000"},
                          files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")}) as r:
            for _ in r.iter_raw():
                pass
            return r.status_code
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(long_stream) for _ in range(2)]
        time.sleep(0.8)
        r = post(server.url)
        assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
        [h.result() for h in holders]
    metrics = httpx.get(server.url + "/metrics", headers=KEY).text
    assert "lighttts_http_rejected_total 1" in metrics


def test_websocket_needs_the_key_too(server):
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect
    url = server.url.replace("http", "ws") + "/inference_zero_shot_bistream"
    with pytest.raises((ConnectionClosed, InvalidStatus)):
        with connect(url, open_timeout=30) as ws:
            ws.send('{"prompt_text": "x"}')
            ws.recv(timeout=30)


def test_lighttts_socket_idle_client_is_closed(server):
    """LightTTS's bistream socket: a client that sends nothing gets 408 and a closed socket; one that
    stops sending text mid-utterance gets 504 after --request_timeout (6 s here) and a closed socket,
    and the request is freed in every stage."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect
    url = server.url.replace("http", "ws") + "/inference_zero_shot_bistream"

    def error_then_close(ws, within):
        t0, error = time.time(), None
        with pytest.raises(ConnectionClosed):
            while True:
                frame = ws.recv(timeout=within)
                if isinstance(frame, str):
                    error = json.loads(frame)
        return error, time.time() - t0

    with connect(url, additional_headers=KEY, open_timeout=30) as ws:
        error, waited = error_then_close(ws, 20)
    assert error["status"] == 408 and "request_timeout" in error["error"] and 5 < waited < 12, (error, waited)

    with connect(url, additional_headers=KEY, open_timeout=30) as ws:
        ws.send(json.dumps({"prompt_text": PROMPT_TEXT, "tts_model_name": "tiny"}))
        ws.send(PROMPT)
        ws.send(json.dumps({"tts_text": "A sentence that never gets its finish."}))
        error, waited = error_then_close(ws, 30)
    assert error["status"] == 504 and "request_timeout" in error["error"] and 5 < waited < 15, (error, waited)
    deadline = time.time() + 10
    while "lighttts_llm_kv_used 0.0" not in httpx.get(server.url + "/metrics", headers=KEY).text:
        assert time.time() < deadline, "KV not freed after the idle socket was closed"
        time.sleep(0.3)


def test_second_instance_on_the_same_port_is_refused(server, tiny_model_dir):
    import subprocess
    import sys
    from server_util import ROOT, server_env
    zmq_dir = server.proc.args[server.proc.args.index("--zmq_mode") + 1]
    second = [sys.executable, "-m", "light_tts.server.api_server", "--model_dir", tiny_model_dir,
              "--port", str(server.port), "--zmq_mode", zmq_dir]
    # the HTTP port is taken: refused before any stage starts
    out = subprocess.run(second, cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"--port {server.port}: cannot listen" in out.stderr, out.stderr
    # another address, so the port is free there: the instance's IPC directory (named by the port) is not
    out = subprocess.run(second + ["--host", "127.0.0.2"], cwd=ROOT, env=server_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "another LightTTS instance is running" in out.stderr + out.stdout
    assert post(server.url).status_code == 200  # the running instance was left alone
