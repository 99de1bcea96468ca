"""The real server (subprocess, tiny model, CPU) over real HTTP: every endpoint, both response
modes, aliases, JSON+base64, voices, bad input, concurrency across 2 HTTP workers."""
import base64
import concurrent.futures
import json
import os
import re
import time

import httpx
import pytest

from light_tts.server.http.metrics import FIRST_CHUNK_STAGES, first_chunk_stages
from light_tts.server.io_struct import FIRST_CHUNK_MARKS

from server_util import PROMPT_TEXT, PROMPT_WAV, ROOT, Server, wav_info

pytestmark = pytest.mark.server   # starts server processes: not in the fast tier

PROMPT = open(PROMPT_WAV, "rb").read()
N = 30                        # speech tokens per request: 30 tokens = 60 mel frames = 1.2 s
SAMPLES = N * 960             # 24 kHz samples for N tokens


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    with Server.api_server(tiny_model_dir, tmp, "--httpserver_workers", "2", "--decode_process_num", "2") as srv:
        yield srv


def zero_shot(url, stream=False, **extra):
    data = {"prompt_text": PROMPT_TEXT, "tts_text": "Hello there, a short test sentence.",
            "stream": str(stream).lower(), "fixed_speech_tokens": str(N), **extra}
    return httpx.post(url + "/inference_zero_shot", data=data, files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")},
                      timeout=120)


def test_health_and_model_query(server):
    for path in ("/healthz", "/health", "/readiness"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.json() == {"status": "healthy"}
    assert httpx.get(server.url + "/liveness").status_code == 200
    for method in ("GET", "POST"):
        r = httpx.request(method, server.url + "/query_tts_model")
        assert r.json() == {"tts_models": ["tiny"], "model_family": "cosyvoice2"}


def test_zero_shot_wav(server):
    r = zero_shot(server.url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav"
    rate, channels, bits, nbytes = wav_info(r.content)
    assert (rate, channels, bits) == (24000, 1, 16) and nbytes == SAMPLES * 2 == len(r.content) - 44


def test_zero_shot_streaming_raw_pcm(server):
    with httpx.stream("POST", server.url + "/inference_zero_shot", timeout=120,
                      data={"prompt_text": PROMPT_TEXT, "tts_text": "Streaming test, please.", "stream": "true",
                            "fixed_speech_tokens": "80"},
                      files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")}) as r:
        assert r.status_code == 200
        chunks = [c for c in r.iter_raw() if c]
    body = b"".join(chunks)
    assert body[:4] != b"RIFF" and len(body) == 80 * 960 * 2
    assert len(chunks) >= 2  # more than one chunk arrived: audio streamed while being made


def test_streaming_wav_format_and_seed_002_aliases(server):
    r = httpx.post(server.url + "/inference_zero_shot", timeout=120,
                   data={"text": "Seed two aliases.", "streaming": "true", "format": "wav", "language": "en",
                         "fixed_speech_tokens": str(N)},
                   files={"prompt_audio": ("p.wav", PROMPT, "audio/wav")})
    # seed 002 sends `text` (what to speak) and no transcript: the voice is cloned as cross-lingual does
    assert r.status_code == 200, r.text
    assert r.content[:4] == b"RIFF" and len(r.content) == 44 + SAMPLES * 2
    r = httpx.post(server.url + "/inference_zero_shot", timeout=120,
                   data={"text": "Seed two aliases.", "prompt_text": PROMPT_TEXT, "streaming": "true",
                         "format": "wav", "fixed_speech_tokens": str(N)},
                   files={"prompt_audio": ("p.wav", PROMPT, "audio/wav")})
    assert r.status_code == 200, r.text
    assert r.content[:4] == b"RIFF" and len(r.content) == 44 + SAMPLES * 2


def test_json_base64(server):
    body = {"tts_text": "JSON request.", "prompt_text": PROMPT_TEXT, "prompt_wav": base64.b64encode(PROMPT).decode(),
            "fixed_speech_tokens": N}
    r = httpx.post(server.url + "/inference_zero_shot", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert wav_info(r.content)[3] == SAMPLES * 2
    bad = dict(body, prompt_wav="@@not base64@@")
    r = httpx.post(server.url + "/inference_zero_shot", json=bad, timeout=30)
    assert r.status_code == 400 and "base64" in r.json()["detail"]
    r = httpx.post(server.url + "/inference_zero_shot", content=b"{broken", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    # what a plain json.loads lets through as a 500: deep nesting (RecursionError), a lone surrogate
    for path in ("/inference_zero_shot", "/v1/audio/speech", "/voices"):
        r = httpx.post(server.url + path, content=b"[" * 100000, timeout=30, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested too deeply" in r.json()["detail"], (path, r.text)
    r = httpx.post(server.url + "/inference_zero_shot", content=json.dumps(dict(body, tts_text="Hi \ud800")),
                   timeout=30, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "field 'tts_text'" in r.json()["detail"] and "surrogate" in r.json()["detail"]


def test_official_runtime_get_returns_raw_pcm(server):
    # the official CosyVoice client: GET with form fields and a file, reads raw int16 PCM
    r = httpx.request("GET", server.url + "/inference_cross_lingual", timeout=120,
                      data={"tts_text": "Official client.", "fixed_speech_tokens": str(N)},
                      files={"prompt_wav": ("prompt_wav", PROMPT, "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert r.content[:4] != b"RIFF" and len(r.content) == SAMPLES * 2


def test_instruct2(server):
    r = httpx.post(server.url + "/inference_instruct2", timeout=120,
                   data={"tts_text": "Instructed speech.", "instruct_text": "Speak slowly.",
                         "fixed_speech_tokens": str(N)}, files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")})
    assert r.status_code == 200 and wav_info(r.content)[3] == SAMPLES * 2
    r = httpx.post(server.url + "/inference_instruct2", timeout=30, data={"tts_text": "x"},
                   files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")})
    assert r.status_code == 400 and "instruct_text" in r.json()["detail"]


def test_voices_lifecycle(server):
    r = httpx.post(server.url + "/voices", data={"voice_id": "alice", "prompt_text": PROMPT_TEXT},
                   files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["voice_id"] == "alice" and r.json()["speech_tokens"] > 50
    # voice_id instead of an upload, on several endpoints; each HTTP worker and encode process knows it
    for _ in range(3):
        r = httpx.post(server.url + "/inference_zero_shot", timeout=120,
                       data={"tts_text": "Registered voice.", "voice_id": "alice", "fixed_speech_tokens": str(N)})
        assert r.status_code == 200, r.text
    r = httpx.request("GET", server.url + "/inference_sft", timeout=120,
                      data={"tts_text": "Official sft client.", "spk_id": "alice", "fixed_speech_tokens": str(N)})
    assert r.status_code == 200 and len(r.content) == SAMPLES * 2
    r = httpx.post(server.url + "/v1/audio/speech", timeout=120,
                   json={"model": "tiny", "input": "OpenAI shape.", "voice": "alice", "response_format": "pcm",
                         "fixed_speech_tokens": N})
    assert r.status_code == 200 and len(r.content) == SAMPLES * 2
    listed = httpx.get(server.url + "/voices").json()["voices"]
    assert [v["voice_id"] for v in listed] == ["alice"] and listed[0]["registered_at"].endswith("+00:00")
    assert httpx.delete(server.url + "/voices/alice").status_code == 200
    assert httpx.get(server.url + "/voices").json() == {"voices": []}
    assert httpx.delete(server.url + "/voices/alice").status_code == 404
    r = httpx.post(server.url + "/inference_zero_shot", timeout=30, data={"tts_text": "x", "voice_id": "alice"})
    assert r.status_code == 404 and "unknown voice_id" in r.json()["detail"]


def test_the_300m_instruct_route_points_to_instruct2(server):
    for method in ("GET", "POST"):
        r = httpx.request(method, server.url + "/inference_instruct", data={"tts_text": "x", "spk_id": "a"},
                          timeout=30)
        assert r.status_code == 400 and "/inference_instruct2" in r.json()["detail"]


@pytest.mark.parametrize("data,files,status,reason", [
    ({"prompt_text": PROMPT_TEXT}, True, 400, "tts_text is required"),
    ({"prompt_text": PROMPT_TEXT, "tts_text": "   "}, True, 400, "tts_text is required"),
    ({"prompt_text": PROMPT_TEXT, "tts_text": "x" * 3000}, True, 400, "--max_req_total_len"),
    ({"prompt_text": PROMPT_TEXT, "tts_text": "no audio"}, False, 400, "prompt_wav is required"),
    ({"prompt_text": PROMPT_TEXT, "tts_text": "hi", "speed": "fast"}, True, 400, "speed"),
    ({"prompt_text": PROMPT_TEXT, "tts_text": "hi", "seed": "-3"}, True, 400, "seed"),
    ({"prompt_text": PROMPT_TEXT, "tts_text": "hi", "stream": "maybe"}, True, 400, "stream"),
    ({"prompt_text": PROMPT_TEXT, "tts_text": "。。！"}, True, 400, "nothing to speak"),
])
def test_bad_input_gets_a_reason(server, data, files, status, reason):
    f = {"prompt_wav": ("p.wav", PROMPT, "audio/wav")} if files else None
    r = httpx.post(server.url + "/inference_zero_shot", data=data, files=f, timeout=60)
    assert r.status_code == status, r.text
    assert reason in r.json()["detail"]


def test_bad_audio_and_content_type(server):
    r = httpx.post(server.url + "/inference_zero_shot", data={"prompt_text": PROMPT_TEXT, "tts_text": "hi"},
                   files={"prompt_wav": ("p.wav", b"this is not audio" * 50, "audio/wav")}, timeout=60)
    assert r.status_code == 400 and "could not decode" in r.json()["detail"]
    r = httpx.post(server.url + "/inference_zero_shot", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert httpx.get(server.url + "/no_such_endpoint").status_code == 404
    assert httpx.put(server.url + "/healthz").status_code == 405
    # the server keeps serving after all of that
    assert zero_shot(server.url).status_code == 200


def test_concurrent_requests_are_batched(server):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: zero_shot(server.url, stream=bool(i % 2), seed=str(i)), range(8)))
    assert [r.status_code for r in results] == [200] * 8
    for i, r in enumerate(results):
        assert len(r.content) == SAMPLES * 2 + (0 if i % 2 else 44)
    metrics = httpx.get(server.url + "/metrics").text
    batch = float(re.search(r"^lighttts_llm_max_batch_size (\S+)$", metrics, re.M).group(1))
    assert batch > 1, "the LLM process never decoded more than one request per step"
    assert 'lighttts_requests_total{endpoint="/inference_zero_shot",status="200"}' in metrics
    assert re.search(r'^lighttts_stage_up\{stage="decode:1"\} 1\.0$', metrics, re.M)


def test_first_chunk_breakdown_in_metrics(server):
    """Every stage stamps its mark on a request; /metrics gets the time per stage of the first chunk,
    and the stages add up to no more than the whole first-chunk time."""
    def totals():
        text = httpx.get(server.url + "/metrics").text
        sums, counts = (dict(re.findall(rf'^lighttts_first_chunk_stage_seconds_{k}\{{stage="(\w+)"\}} (\S+)$', text,
                                        re.M)) for k in ("sum", "count"))
        stages = {st: (float(sums[st]), float(counts[st])) for st in sums}
        whole = [float(re.search(rf"^lighttts_first_chunk_seconds_{k} (\S+)$", text, re.M).group(1))
                 for k in ("sum", "count")]
        return stages, whole
    before, whole0 = totals()
    t0 = time.time()
    assert zero_shot(server.url, stream=True, seed="5").status_code == 200
    elapsed = time.time() - t0
    after, whole1 = totals()
    assert whole1[1] == whole0[1] + 1
    spent = {st: after[st][0] - before.get(st, (0.0, 0.0))[0] for st in after
             if after[st][1] == before.get(st, (0.0, 0.0))[1] + 1}
    assert set(spent) == set(FIRST_CHUNK_STAGES), spent
    assert all(v >= 0 for v in spent.values())
    assert 0 < sum(spent.values()) <= (whole1[0] - whole0[0]) + 0.01 <= elapsed + 0.01
    assert spent["decode"] > 0 and spent["prefill"] > 0 and spent["encode"] > 0


def test_benchmark_client_knows_the_stages():
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "scripts", "bench", "benchmark.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.STAGES == FIRST_CHUNK_STAGES


def test_first_chunk_stages_skip_missing_marks():
    marks = dict(zip(FIRST_CHUNK_MARKS, range(len(FIRST_CHUNK_MARKS))))
    assert first_chunk_stages(marks, 10.0) == [(s, 1.0) for s in FIRST_CHUNK_STAGES[:-1]] + [("to_http", 3.0)]
    del marks["prefill_start"]
    got = dict(first_chunk_stages(marks, 10.0))
    assert "llm_wait" not in got and "prefill" not in got and got["first_tokens"] == 1.0


def _metric(text, name):
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _wait_aborted_everywhere(server, before: float, seconds: float = 10) -> str:
    """/metrics once the LLM counts an abort more than `before`, runs nothing, and no decode process
    holds a request (fails after `seconds`)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        text = httpx.get(server.url + "/metrics").text
        if (_metric(text, "lighttts_llm_aborted") or 0) > before and _metric(text, "lighttts_llm_running") == 0 \
                and all(float(v) == 0 for v in re.findall(r'^lighttts_decode_active\{[^}]*\} (\S+)$', text, re.M)):
            return text
        time.sleep(0.2)
    pytest.fail(f"request not aborted everywhere:\n{text}")


def test_client_disconnect_aborts_in_every_stage(server):
    before = _metric(httpx.get(server.url + "/metrics").text, "lighttts_llm_aborted") or 0
    with httpx.stream("POST", server.url + "/inference_zero_shot", timeout=60,
                      data={"prompt_text": PROMPT_TEXT, "tts_text": "A long streaming request.", "stream": "true",
                            "fixed_speech_tokens": "1500"},
                      files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")}) as r:
        assert r.status_code == 200
        next(r.iter_raw())  # first audio arrived; now hang up mid-stream
    text = _wait_aborted_everywhere(server, before)
    assert _metric(text, "lighttts_llm_kv_used") == 0


def test_client_leaving_a_non_streaming_request_aborts_it(server):
    """A non-streaming request's first output is its whole audio: a client that hangs up before
    it is aborted in every stage within about a second, not run to the end."""
    before = _metric(httpx.get(server.url + "/metrics").text, "lighttts_llm_aborted") or 0
    with pytest.raises(httpx.ReadTimeout):   # the client gives up after 1.5 s
        httpx.post(server.url + "/inference_zero_shot", timeout=httpx.Timeout(60, read=1.5),
                   data={"prompt_text": PROMPT_TEXT, "tts_text": "A long request nobody waits for.",
                         "fixed_speech_tokens": "1500"}, files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")})
    _wait_aborted_everywhere(server, before)


def test_websocket_bistream_lighttts_protocol(server):
    import json
    from websockets.sync.client import connect
    with connect(server.url.replace("http", "ws") + "/inference_zero_shot_bistream", open_timeout=30) as ws:
        ws.send(json.dumps({"prompt_text": PROMPT_TEXT, "tts_model_name": "default"}))
        ws.send(PROMPT)
        for piece in ("Hello there, ", "this arrives ", "in pieces."):
            ws.send(json.dumps({"tts_text": piece}))
        ws.send(json.dumps({"finish": True}))
        pcm = b""
        for msg in ws:
            assert isinstance(msg, bytes), msg
            pcm += msg
    # three pieces form one sentence: its length is bounded by the LM's text ratio, and it is PCM16
    assert len(pcm) > 0 and len(pcm) % 1920 == 0
    with connect(server.url.replace("http", "ws") + "/inference_zero_shot_bistream", open_timeout=30) as ws:
        ws.send("not json")
        reply = json.loads(ws.recv(timeout=30))
        assert reply["status"] == 400
    # frames of the wrong kind and text messages of the wrong shape: a 400 that says what was expected
    cases = [([json.dumps({"prompt_text": PROMPT_TEXT}), "not audio"], "expected a binary frame (the prompt audio)"),
             ([b"\x00\x01"], "expected a text frame (JSON)"),
             ([json.dumps({"prompt_text": PROMPT_TEXT}), PROMPT, json.dumps({"tts_text": None})], '{"tts_text": "<text>"}'),
             ([json.dumps({"prompt_text": PROMPT_TEXT}), PROMPT, json.dumps({"text": "hi"})], '{"tts_text": "<text>"}')]
    for frames, expected in cases:
        with connect(server.url.replace("http", "ws") + "/inference_zero_shot_bistream", open_timeout=30) as ws:
            for frame in frames:
                ws.send(frame)
            reply = json.loads(ws.recv(timeout=30))
            assert reply["status"] == 400 and expected in reply["error"], (frames, reply)


LONG_TEXT = " ".join(f"This is sentence number {n} of a long text that the official client reads aloud, one "
                     "sentence after another." for n in ("one", "two", "three", "four", "five", "six"))


def test_official_routes_stream_audio_as_it_is_made(server):
    """The official runtime answers every route with a StreamingResponse, one raw int16 chunk per
    model output (a sentence): its client (GET with form fields and a file) gets the first
    sentence's audio while later ones are still being made, and the same bytes as a whole answer."""
    form = {"tts_text": LONG_TEXT, "fixed_speech_tokens": str(N), "seed": "7"}
    files = {"prompt_wav": ("prompt_wav", PROMPT, "application/octet-stream")}
    t0, arrivals, chunks = time.time(), [], []
    with httpx.stream("GET", server.url + "/inference_cross_lingual", data=form, files=files, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
        assert "content-length" not in r.headers   # streamed (chunked), not one body
        for chunk in r.iter_raw():
            arrivals.append(time.time() - t0)
            chunks.append(chunk)
    streamed = b"".join(chunks)
    assert len(streamed) >= 3 * SAMPLES * 2, "the text should make at least three sentences of N tokens"
    assert len(chunks) >= 2 and arrivals[0] < arrivals[-1]
    whole = httpx.post(server.url + "/inference_cross_lingual", data={**form, "format": "pcm"}, files=files, timeout=120)
    assert whole.status_code == 200 and whole.headers["content-length"] == str(len(whole.content))
    assert whole.content == streamed
    with httpx.stream("GET", server.url + "/inference_sft", timeout=120, data={"tts_text": "Unknown voice.",
                                                                             "spk_id": "nobody"}) as r:
        r.read()
        # an error before the first byte is still a status with a reason, not a cut stream
        assert r.status_code == 404 and "unknown voice_id" in r.json()["detail"]


def test_options_is_405_without_cors(server):
    """CORS is off by default: a browser's preflight gets 405, as before, with no CORS headers."""
    r = httpx.options(server.url + "/inference_zero_shot", headers={
        "Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 405
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]
