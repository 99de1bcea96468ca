"""The HTTP front end's operator options and logs, against a real server (tiny model, CPU) over real
HTTP: CORS (--cors_origins) with an API key, raw PCM as the default non-streaming format
(--default_format pcm), one access line per request and per WebSocket utterance (seed 001's
`grep cost_time` runbook reads them), and the /metrics queue gauge while requests wait.
CORS off by default and the official routes' streaming: tests/test_server.py."""
import base64
import concurrent.futures
import json
import re
import subprocess
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from light_tts.server.args import parse_args
from light_tts.server.http.app import Cors

from server_util import PROMPT_TEXT, PROMPT_WAV, Server

PROMPT = open(PROMPT_WAV, "rb").read()
KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED, OTHER_ALLOWED, DISALLOWED = "https://a.example", "http://localhost:3000", "https://evil.example"
N = 30                        # speech tokens per request: 1.2 s of audio
SAMPLES = N * 960
ACCESS_LINE = re.compile(r"access rid=(?P<rid>\S+) method=(?P<method>\S+) endpoint=(?P<endpoint>\S+) "
                         r"status=(?P<status>\d+) audio_s=(?P<audio>[\d.]+) first_chunk_ms=(?P<first>[\d.]+|-) "
                         r"cost_time: (?P<cost>[\d.]+)ms$")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("opts")
    # one request at a time in the LLM, so concurrent requests queue there (the queue gauge)
    with Server.api_server(tiny_model_dir, tmp, "--cors_origins", f"{ALLOWED}, {OTHER_ALLOWED}", "--api_key", KEY,
                           "--default_format", "pcm", "--running_max_req_size", "1") as srv:
        yield srv


def cors_headers(r: httpx.Response) -> dict:
    return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def synth(url, path="/inference_zero_shot", headers=AUTH, timeout=120, **data):
    return httpx.post(url + path, headers=headers, timeout=timeout,
                      files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")},
                      data={"prompt_text": PROMPT_TEXT, "tts_text": "Hello there, a short test sentence.",
                            "fixed_speech_tokens": str(N), **data})


# ---- CORS -----------------------------------------------------------------------------------------

def test_preflight_from_an_allowed_origin(server):
    for origin in (ALLOWED, OTHER_ALLOWED):
        # what a browser sends before a multipart POST that carries the API key
        r = httpx.options(server.url + "/inference_zero_shot", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert r.status_code == 200, r.text     # answered without the key: a preflight never carries it
        h = cors_headers(r)
        assert h["access-control-allow-origin"] == origin
        assert "POST" in h["access-control-allow-methods"] and "DELETE" in h["access-control-allow-methods"]
        allowed = {x.strip().lower() for x in h["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
    r = httpx.options(server.url + "/voices/alice", headers={"Origin": ALLOWED, "Access-Control-Request-Method":
                                                             "DELETE"})
    assert r.status_code == 200 and cors_headers(r)["access-control-allow-origin"] == ALLOWED


def test_allowed_origin_reads_the_answer(server):
    r = synth(server.url, headers={**AUTH, "Origin": ALLOWED})
    assert r.status_code == 200, r.text
    h = cors_headers(r)
    assert h["access-control-allow-origin"] == ALLOWED
    exposed = h["access-control-expose-headers"]
    assert "X-Request-Id" in exposed and "X-Sample-Rate" in exposed
    # errors are readable too (the page can show why)
    r = httpx.get(server.url + "/query_tts_model", headers={"Origin": ALLOWED})
    assert r.status_code == 401 and cors_headers(r)["access-control-allow-origin"] == ALLOWED


def test_other_origins_get_no_cors_headers(server):
    r = httpx.options(server.url + "/inference_zero_shot", headers={
        "Origin": DISALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert r.status_code in (401, 405) and cors_headers(r) == {}   # as if CORS were off
    for headers in ({**AUTH, "Origin": DISALLOWED}, AUTH, {**AUTH, "Origin": ALLOWED + "/"}):
        r = httpx.get(server.url + "/query_tts_model", headers=headers)
        assert r.status_code == 200 and cors_headers(r) == {}, headers


def test_any_origin_with_a_star():
    app = Cors(Starlette(routes=[Route("/x", lambda request: PlainTextResponse("ok"), methods=["GET", "POST"])]), ["*"])
    client = TestClient(app)
    r = client.options("/x", headers={"Origin": "https://anywhere.example", "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "Authorization"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = client.get("/x", headers={"Origin": "https://anywhere.example"})
    assert r.text == "ok" and r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-origin" not in client.get("/x").headers   # no Origin: not a CORS request


def test_cors_origins_flag_is_checked(tiny_model_dir, capsys):
    for good in ("*", "https://a.example", "https://a.example:8443, http://localhost:3000", ""):
        assert parse_args(["--model_dir", tiny_model_dir, "--cors_origins", good]).cors_origins == good
    for bad in ("https://a.example/", "a.example", "https://a.example/app"):
        with pytest.raises(SystemExit) as e:
            parse_args(["--model_dir", tiny_model_dir, "--cors_origins", bad])
        assert e.value.code == 2 and "--cors_origins" in capsys.readouterr().err


# ---- --default_format pcm -------------------------------------------------------------------------

def test_default_format_pcm_for_lighttts_clients(server):
    r = synth(server.url)                       # LightTTS's non-streaming client: raw PCM, no WAV header
    assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
    assert r.content[:4] != b"RIFF" and len(r.content) == SAMPLES * 2
    r = synth(server.url, format="wav")         # a request's explicit format wins
    assert r.content[:4] == b"RIFF" and len(r.content) == 44 + SAMPLES * 2
    r = synth(server.url, stream="true")        # streaming was raw PCM already
    assert r.content[:4] != b"RIFF" and len(r.content) == SAMPLES * 2


def test_default_format_flag_is_checked(tiny_model_dir, capsys):
    assert parse_args(["--model_dir", tiny_model_dir]).default_format == "wav"
    assert parse_args(["--model_dir", tiny_model_dir, "--default_format", "PCM"]).default_format == "pcm"
    with pytest.raises(SystemExit):
        parse_args(["--model_dir", tiny_model_dir, "--default_format", "mp3"])
    assert "--default_format" in capsys.readouterr().err


# ---- access log -----------------------------------------------------------------------------------

def access_lines(server) -> list[dict]:
    with open(server.log_path, errors="replace") as f:
        return [m.groupdict() for line in f if (m := ACCESS_LINE.search(line.rstrip("\n")))]


def access_line(server, seconds: float = 10, **want) -> dict:
    """The access line whose fields include `want` (written when the answer has been sent: wait for it)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = [d for d in access_lines(server) if all(d[k] == v for k, v in want.items())]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.1)
    pytest.fail(f"no access line with {want}:\n{server.tail()}")


def test_access_line_per_request(server):
    ok = synth(server.url)
    bad = synth(server.url, tts_text="")
    with httpx.stream("POST", server.url + "/inference_zero_shot", headers=AUTH, timeout=120,
                      files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")},
                      data={"prompt_text": PROMPT_TEXT, "tts_text": "Streaming test.", "stream": "true",
                            "fixed_speech_tokens": "80"}) as streamed:
        body = streamed.read()
    unauthorized = httpx.get(server.url + "/query_tts_model")
    assert (ok.status_code, bad.status_code, streamed.status_code, unauthorized.status_code) == (200, 400, 200, 401)
    lines = {}
    for name, r, status, audio in (("ok", ok, "200", SAMPLES / 24000), ("bad", bad, "400", 0.0),
                                   ("streamed", streamed, "200", len(body) / 2 / 24000),
                                   ("unauthorized", unauthorized, "401", 0.0)):
        rid = r.headers["x-request-id"]
        line = lines[name] = access_line(server, rid=rid)
        assert line["status"] == status and float(line["audio"]) == pytest.approx(audio, abs=1e-3), (name, line)
        assert line["method"] == ("GET" if name == "unauthorized" else "POST")
        assert line["endpoint"] == ("/query_tts_model" if name == "unauthorized" else "/inference_zero_shot")
    for name in ("ok", "streamed"):
        first, cost = float(lines[name]["first"]), float(lines[name]["cost"])
        assert 0 < first <= cost
    assert lines["bad"]["first"] == "-"
    # seed 001's runbook: the last field of every cost_time line is "<ms>ms"
    out = subprocess.run(f"grep cost_time {server.log_path} | awk '{{print $NF}}' | sed 's/ms//'", shell=True,
                         capture_output=True, text=True, check=True).stdout.split()
    assert len(out) >= 4 and all(float(v) >= 0 for v in out)


def test_access_line_per_websocket_utterance(server):
    from websockets.sync.client import connect
    with connect(server.url.replace("http", "ws") + "/ws/tts", additional_headers=AUTH, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start", "prompt_text": PROMPT_TEXT, "max_speech_tokens": N,
                            "prompt_wav": base64.b64encode(PROMPT).decode()}))
        assert json.loads(ws.recv(timeout=60))["type"] == "started"
        ws.send(json.dumps({"type": "text", "text": "A websocket utterance."}))
        ws.send(json.dumps({"type": "finish"}))
        while True:
            msg = ws.recv(timeout=120)
            if isinstance(msg, str) and json.loads(msg)["type"] in ("done", "error"):
                done = json.loads(msg)
                break
        assert done["type"] == "done"
        ws.send(json.dumps({"type": "start", "voice_id": "bad id!"}))   # refused: an error line of its own
        assert json.loads(ws.recv(timeout=60))["status"] == 400
    line = access_line(server, method="WS", endpoint="/ws/tts", status="200")
    assert float(line["audio"]) == pytest.approx(done["audio_seconds"], abs=1e-3) and line["first"] != "-"
    access_line(server, method="WS", endpoint="/ws/tts", status="400")
    with pytest.raises(Exception):          # no key: the upgrade is refused (403), and logged
        with connect(server.url.replace("http", "ws") + "/ws/tts", open_timeout=30):
            pass
    access_line(server, method="WS", endpoint="/ws/tts", status="403")


# ---- the queue gauge ------------------------------------------------------------------------------

def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_queue_gauge_counts_requests_waiting_for_the_llm(server):
    """--running_max_req_size 1: of several concurrent requests the LLM runs one, the rest wait in
    its queue, and /metrics shows them under a name with `queue` (what seed 001 greps for)."""
    def scrape():
        text = httpx.get(server.url + "/metrics", headers=AUTH).text
        queued = metric(text, "lighttts_llm_queue_size")
        assert queued == metric(text, "lighttts_llm_waiting")   # the LLM stage's own count
        return queued
    assert scrape() == 0
    seen = 0.0
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(synth, server.url, fixed_speech_tokens="60", seed=str(i), timeout=600)
                   for i in range(3)]
        while not all(f.done() for f in futures):
            seen = max(seen, scrape())
            time.sleep(0.1)
        assert [f.result().status_code for f in futures] == [200] * 3
    assert seen >= 1
    deadline = time.time() + 10
    while scrape() != 0:
        assert time.time() < deadline, "the queue gauge did not return to 0"
        time.sleep(0.2)
