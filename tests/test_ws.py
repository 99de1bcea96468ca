"""WS /ws/tts against a real server (tiny model, CPU, real processes and sockets): streamed text
gives audio before finish, interrupt stops within a chunk and frees the KV pool, malformed
messages get error events and the socket goes on, parallel sessions and scripts/ws_client.py."""
import base64
import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from websockets.sync.client import connect

from server_util import PROMPT_TEXT, PROMPT_WAV, ROOT, Server, server_env

pytestmark = pytest.mark.server   # starts server processes: not in the fast tier

PROMPT = open(PROMPT_WAV, "rb").read()
LONG_TEXT = ("Streaming speech starts while the sentence is still being written, one small piece at a time, "
             "so the listener hears the first words almost at once; the rest follows as the model writes it, "
             "and the speaker can be cut off the moment the human starts to talk over it again.")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ws")
    with Server.api_server(tiny_model_dir, tmp, "--bistream_max_len", "600", "--request_timeout", "60") as srv:
        yield srv


def ws_url(server):
    return server.url.replace("http", "ws") + "/ws/tts"


def start_msg(**extra):
    return json.dumps({"type": "start", "prompt_text": PROMPT_TEXT, "prompt_wav": base64.b64encode(PROMPT).decode(),
                       **extra})


def recv_json(ws, timeout=60):
    msg = ws.recv(timeout=timeout)
    assert isinstance(msg, str), "expected a JSON event, got audio"
    return json.loads(msg)


def collect(ws, until, timeout=120):
    """Events and audio until an event of type in `until`; returns (events, audio bytes, frames)."""
    events, audio, frames = [], b"", 0
    deadline = time.time() + timeout
    while True:
        msg = ws.recv(timeout=max(0.1, deadline - time.time()))
        if isinstance(msg, bytes):
            audio += msg
            frames += 1
            continue
        ev = json.loads(msg)
        events.append(ev)
        if ev["type"] in until:
            return events, audio, frames


def metric(server, name):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def wait_pool_free(server, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metric(server, "lighttts_llm_kv_used") == 0 and metric(server, "lighttts_llm_running") == 0:
            return
        time.sleep(0.2)
    pytest.fail("the KV pool did not return to free")


def test_audio_before_finish_then_done(server):
    """Text streams in small pieces; audio arrives while finish has not been sent; then done."""
    with connect(ws_url(server), open_timeout=30, max_size=None) as ws:
        ws.send(start_msg(seed=3, max_speech_tokens=30))
        started = recv_json(ws)
        assert started == {"type": "started", "utterance": 0, "request_id": None}
        first_audio, sent = None, 0
        for i in range(0, len(LONG_TEXT), 6):
            ws.send(json.dumps({"type": "text", "text": LONG_TEXT[i:i + 6]}))
            sent = i + 6
            try:
                msg = ws.recv(timeout=0.05)
            except TimeoutError:
                continue
            assert isinstance(msg, bytes), msg
            first_audio = msg
            break
        if first_audio is None:       # all text is out; audio must still come before finish
            msg = ws.recv(timeout=120)
            assert isinstance(msg, bytes), msg
            first_audio = msg
        chunk = recv_json(ws)
        assert chunk["type"] == "chunk" and chunk["index"] == 0 and chunk["samples"] == len(first_audio) // 2
        for i in range(sent, len(LONG_TEXT), 40):
            ws.send(json.dumps({"type": "text", "text": LONG_TEXT[i:i + 40]}))
        ws.send(json.dumps({"type": "finish"}))
        events, audio, frames = collect(ws, {"done", "error"})
        done = events[-1]
        assert done["type"] == "done", events
        assert done["chunks"] == frames + 1
        assert done["audio_seconds"] == pytest.approx((len(first_audio) + len(audio)) / 2 / 24000, abs=1e-3)
        chunk_events = [e for e in events if e["type"] == "chunk"]
        assert [e["index"] for e in chunk_events] == list(range(1, frames + 1))
    wait_pool_free(server)


def test_interrupt_stops_within_a_chunk_and_frees_kv(server):
    with connect(ws_url(server), open_timeout=30, max_size=None) as ws:
        ws.send(start_msg(seed=5))
        assert recv_json(ws)["type"] == "started"
        ws.send(json.dumps({"type": "text", "text": LONG_TEXT * 2}))   # no finish: it would run on
        while not isinstance(ws.recv(timeout=120), bytes):
            pass
        ws.send(json.dumps({"type": "interrupt"}))
        events, audio, frames = collect(ws, {"interrupted", "error"}, timeout=10)
        assert events[-1] == {"type": "interrupted", "utterance": 0}
        assert frames <= 1                      # at most the chunk already on its way
        with pytest.raises(TimeoutError):       # nothing of it follows
            ws.recv(timeout=1.0)
        wait_pool_free(server)
        # the socket starts the next utterance at once
        ws.send(start_msg(seed=6, max_speech_tokens=20))
        assert recv_json(ws)["utterance"] == 1
        ws.send(json.dumps({"type": "text", "text": "A second, short utterance on the same socket."}))
        ws.send(json.dumps({"type": "finish"}))
        events, audio, frames = collect(ws, {"done", "error"})
        assert events[-1]["type"] == "done" and frames > 0


def test_malformed_messages_get_errors_and_the_socket_goes_on(server):
    with connect(ws_url(server), open_timeout=30, max_size=None) as ws:
        cases = ["not json", json.dumps([1, 2]), json.dumps({"type": "sing"}), json.dumps({"type": "text", "text": "x"}),
                 json.dumps({"type": "finish"}), json.dumps({"type": "start"}),
                 json.dumps({"type": "start", "voice_id": "../etc"}),
                 json.dumps({"type": "start", "prompt_wav": "%%%", "prompt_text": "x"}),
                 json.dumps({"type": "start", "voice_id": "v", "seed": "abc"}),
                 "[" * 100000, json.dumps({"type": "text", "text": "Hi \ud800"})]   # (json.loads: a 500 once)
        for raw in cases:
            ws.send(raw)
            ev = recv_json(ws)
            assert ev["type"] == "error" and 400 <= ev["status"] < 500 and ev["final"] is False, (raw, ev)
            assert ev["message"]
        ws.send(b"\x00\x01")
        assert recv_json(ws)["status"] == 400
        # an utterance whose voice cannot be used ends with a final error; the socket stays usable
        ws.send(json.dumps({"type": "start", "voice_id": "nobody-registered-this"}))
        assert recv_json(ws)["type"] == "started"
        ws.send(json.dumps({"type": "text", "text": "hello"}))
        ev = recv_json(ws)
        assert ev["type"] == "error" and ev["status"] == 404 and ev["final"] is True and ev["utterance"] == 0
        ws.send(json.dumps({"type": "start", "prompt_wav": base64.b64encode(b"RIFF....garbage").decode(),
                            "prompt_text": "x"}))
        # refused at start (the header is read before the utterance opens), or after "started" by the encode stage
        ev = recv_json(ws)
        if ev["type"] == "error" and ev["status"] == 409 and not ev["final"]:
            # the 404 above ended the utterance before "hello" was read: that text got its own 409
            assert "no utterance is active" in ev["message"], ev
            ev = recv_json(ws)
        if ev["type"] == "started":
            ev = recv_json(ws)
            assert ev["final"] is True
        assert ev["type"] == "error" and ev["status"] == 400 and "prompt audio" in ev["message"], ev
        # text in a live utterance but after finish
        ws.send(start_msg(max_speech_tokens=5))
        assert recv_json(ws)["type"] == "started"
        ws.send(json.dumps({"type": "text", "text": "Short."}))
        ws.send(json.dumps({"type": "finish"}))
        ws.send(json.dumps({"type": "finish"}))
        events, _, _ = collect(ws, {"done"})
        assert any(e["type"] == "error" and e["status"] == 409 and not e["final"] for e in events) or \
            recv_json(ws)["status"] == 409
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


def test_registered_voice_and_lighttts_protocol(server):
    r = httpx.post(server.url + "/voices", data={"voice_id": "wsvoice", "prompt_text": PROMPT_TEXT},
                   files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")}, timeout=60)
    assert r.status_code == 200, r.text
    with connect(ws_url(server), open_timeout=30, max_size=None) as ws:
        ws.send(json.dumps({"type": "start", "voice_id": "wsvoice", "max_speech_tokens": 10, "request_id": "r1"}))
        assert recv_json(ws) == {"type": "started", "utterance": 0, "request_id": "r1"}
        ws.send(json.dumps({"type": "text", "text": LONG_TEXT}))
        ws.send(json.dumps({"type": "finish"}))
        events, audio, frames = collect(ws, {"done", "error"})
        assert events[-1]["type"] == "done" and len(audio) > 0


def run_client(server, *args, timeout=600):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "ws_client.py"), "--url", ws_url(server), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=server_env())


def test_ws_client_bench_parallel_sessions(server, tmp_path):
    # 4 sessions at once exercise the client's parallel bench; the 20-socket run is the GPU's (gpu.sh ws)
    out = tmp_path / "bench.json"
    r = run_client(server, "--bench", "--parallel", "4", "--rounds", "1", "--max-speech-tokens", "15",
                   "--piece-interval-ms", "5", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    results = data.get("utterances") or data.get("results")
    assert len(results) == 4
    wait_pool_free(server)


def test_ws_client_interrupt_check(server):
    # correctness only (interrupted comes, no audio after it): the client's 2 s latency deadline is
    # for the GPU run (scripts/gpu.sh ws); a loaded 2-core machine gets a hang detector instead
    r = run_client(server, "--test-interrupt", "--seed", "9", "--max-speech-tokens", "20",
                   "--interrupt-deadline-ms", "60000")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
    wait_pool_free(server)


def test_fuzzed_messages_never_break_the_socket(server):
    """Random frames (JSON of every shape, known types with wrong fields, bytes, text) on one socket:
    each gets a well-formed event with a 4xx status or is accepted; the socket and server go on.
    A sentinel after each frame (an unknown type naming its index) marks where its replies end."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_subnormal=False),  # FTZ may be on (torch)
                        st.text(max_size=40))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=8), inner, max_size=3), max_leaves=6)
    fields = st.sampled_from(["type", "text", "voice_id", "prompt_text", "prompt_wav", "seed", "max_speech_tokens",
                              "request_id", "finish", "tts_text"])
    typed = st.builds(lambda t, extra: json.dumps({"type": t, **extra}),
                      st.sampled_from(["start", "text", "finish", "interrupt", "Start", "", "pause"]),
                      st.dictionaries(fields, values, max_size=4))
    frames = st.one_of(typed, values.map(json.dumps), st.text(max_size=60), st.binary(max_size=60))
    counter = iter(range(10**6))
    with connect(ws_url(server), open_timeout=30, max_size=None) as ws:
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(frames)
        def check(frame):
            n = next(counter)
            ws.send(frame)
            ws.send(json.dumps({"type": f"sentinel-{n}"}))
            deadline = time.time() + 60
            while True:
                msg = ws.recv(timeout=max(0.1, deadline - time.time()))
                if isinstance(msg, bytes):
                    continue
                ev = json.loads(msg)
                assert ev["type"] in ("started", "chunk", "done", "interrupted", "error"), ev
                if ev["type"] == "error":
                    assert 400 <= ev["status"] < 500 and isinstance(ev["message"], str) and ev["message"], ev
                    if f"sentinel-{n}" in ev["message"]:
                        return
        check()
        ws.send(json.dumps({"type": "interrupt"}))   # end whatever the fuzz left running
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    wait_pool_free(server)
