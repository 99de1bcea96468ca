"""Registered voices shared by the instances of a deployment (issue 19 item 2) and the per-key voice
quota (issue 21 item 7): two real servers on two ports with one --voice_dir and two API keys.

A voice registered through one instance is usable through the other, a delete through one is a 404
on the other, a restarted instance still has the voices, two instances registering one id at the
same moment leave one voice that both serve, and one key cannot fill the list: over its quota it
gets 429 while the other key still registers (then 507 when the whole store is full)."""
import concurrent.futures
import os

import httpx
import pytest

from light_tts.tools.client_util import ServerProcess, api_server_cmd, free_port
from server_util import FIXTURES, PROMPT_TEXT, PROMPT_WAV, SMALL_LIMITS, server_env, wav_info

pytestmark = pytest.mark.server

KEYS = ("key-one", "key-two")
MAX_VOICES, QUOTA = 4, 3
PROMPT = open(PROMPT_WAV, "rb").read()
PROMPT_5S = open(os.path.join(FIXTURES, "prompt_en_5s.wav"), "rb").read()
PROMPT_5S_TEXT = "A second prompt, a little longer than the first one."
N = 10   # speech tokens per request: short and deterministic


def auth(key=KEYS[0]):
    return {"Authorization": f"Bearer {key}"}


def start(model_dir, tmp, voice_dir, name):
    port = free_port()
    cmd = api_server_cmd(model_dir, port, str(tmp / name), *SMALL_LIMITS, "--voice_dir", voice_dir,
                         "--max_voices", str(MAX_VOICES), "--voice_quota", str(QUOTA))
    (tmp / name).mkdir(exist_ok=True)
    return ServerProcess(cmd, port, str(tmp / f"{name}-{port}.log"),
                         env={**server_env(), "LIGHTTTS_API_KEY": ",".join(KEYS)})


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    """[A, B]: two instances sharing one voice directory (a test may replace B by a restarted one)."""
    tmp = tmp_path_factory.mktemp("shared")
    voice_dir = str(tmp / "voices")            # missing: the server creates it, 0700
    servers = [start(tiny_model_dir, tmp, voice_dir, "a"), start(tiny_model_dir, tmp, voice_dir, "b")]
    try:
        for s in servers:
            s.wait_healthy(300)
        servers.append(voice_dir)
        servers.append(lambda name: start(tiny_model_dir, tmp, voice_dir, name))
        yield servers
    finally:
        for s in servers[:2]:
            s.stop()


def register(server, voice_id, key=KEYS[0], audio=PROMPT, text=PROMPT_TEXT):
    return httpx.post(server.url + "/voices", headers=auth(key), timeout=120, data={"voice_id": voice_id,
                      "prompt_text": text}, files={"prompt_wav": ("p.wav", audio, "audio/wav")})


def speak(server, voice_id, seed="3"):
    return httpx.post(server.url + "/inference_zero_shot", headers=auth(), timeout=120, data={
        "voice_id": voice_id, "tts_text": "Shared voice test.", "fixed_speech_tokens": str(N), "seed": seed,
        "format": "pcm"})


def delete(server, voice_id, key=KEYS[0]):
    return httpx.delete(server.url + f"/voices/{voice_id}", headers=auth(key), timeout=60)


def listed(server, key=KEYS[0]):
    return [v["voice_id"] for v in httpx.get(server.url + "/voices", headers=auth(key), timeout=30).json()["voices"]]


def test_registered_on_one_instance_usable_and_deleted_through_the_other(pair):
    a, b, voice_dir = pair[0], pair[1], pair[2]
    assert oct(os.stat(voice_dir).st_mode & 0o777) == "0o700"
    assert speak(b, "dave").status_code == 404               # nobody has it yet
    r = register(a, "dave")
    assert r.status_code == 200, r.text
    for _ in range(3):                                        # the reproducer: alternate instances
        for s in (b, a):
            r = speak(s, "dave")
            assert r.status_code == 200 and len(r.content) > 0, r.text
    assert listed(a) == listed(b) == ["dave"]
    assert [n for n in os.listdir(voice_dir) if n.endswith(".npz")] != []
    assert not any("dave" in n for n in os.listdir(voice_dir))   # hashed names, never the id
    assert delete(b, "dave").status_code == 200
    r = speak(a, "dave")                                      # A had used it: it must not answer from memory
    assert r.status_code == 404 and "unknown voice_id" in r.json()["detail"], r.text
    assert delete(a, "dave").status_code == 404
    assert listed(a) == listed(b) == []


def test_one_id_registered_on_both_instances_at_once_leaves_one_voice(pair):
    a, b, voice_dir = pair[0], pair[1], pair[2]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fa = pool.submit(register, a, "erin", KEYS[0], PROMPT, PROMPT_TEXT)
        fb = pool.submit(register, b, "erin", KEYS[0], PROMPT_5S, PROMPT_5S_TEXT)
        ra, rb = fa.result(), fb.result()
    assert ra.status_code == 200 and rb.status_code == 200, (ra.text, rb.text)
    names = os.listdir(voice_dir)
    assert len([n for n in names if n.endswith(".npz")]) == 1 and not [n for n in names if n.endswith(".tmp")], names
    assert listed(a) == listed(b) == ["erin"]
    # both instances speak with the same voice, and it is one of the two prompts, whole
    out_a, out_b = speak(a, "erin"), speak(b, "erin")
    assert out_a.status_code == out_b.status_code == 200
    assert out_a.content == out_b.content
    uploads = [httpx.post(a.url + "/inference_zero_shot", headers=auth(), timeout=120, data={
        "prompt_text": text, "tts_text": "Shared voice test.", "fixed_speech_tokens": str(N), "seed": "3",
        "format": "pcm"}, files={"prompt_wav": ("p.wav", audio, "audio/wav")}).content
        for audio, text in ((PROMPT, PROMPT_TEXT), (PROMPT_5S, PROMPT_5S_TEXT))]
    assert uploads[0] != uploads[1] and out_a.content in uploads
    assert delete(a, "erin").status_code == 200


def test_voices_survive_a_restart(pair):
    a, b = pair[0], pair[1]
    assert register(b, "frank").status_code == 200
    b.stop()                                    # its private directory goes; the voice directory stays
    pair[1] = b2 = pair[3]("b2")
    b2.wait_healthy(300)
    assert listed(b2) == ["frank"]
    r = speak(b2, "frank")
    assert r.status_code == 200 and len(r.content) == len(speak(a, "frank").content)
    assert delete(b2, "frank").status_code == 200


def test_per_key_quota(pair):
    a, b = pair[0], pair[1]
    for i, s in enumerate((a, b, a)):           # key one: its quota (3), through both instances
        r = register(s, f"q{i}")
        assert r.status_code == 200, r.text
    r = register(b, "q3")                       # the deployment's count, not the instance's
    assert r.status_code == 429 and "quota" in r.json()["detail"] and "--voice_quota 3" in r.json()["detail"], r.text
    r = register(a, "r0", KEYS[1])             # the other key still registers ...
    assert r.status_code == 200, r.text
    r = register(b, "r1", KEYS[1])             # ... until the store is full (--max_voices 4), under its quota
    assert r.status_code == 507 and "--max_voices 4" in r.json()["detail"], r.text
    # one key cannot replace or delete the other's voice
    assert register(a, "q0", KEYS[1]).status_code == 403
    assert delete(b, "q0", KEYS[1]).status_code == 403
    assert httpx.post(a.url + "/voices", timeout=30, data={"voice_id": "x"}).status_code == 401
    body = httpx.get(b.url + "/voices", headers=auth(), timeout=30).json()
    assert body["quota"] == {"used": 3, "limit": 3} and len(body["voices"]) == 4
    assert register(a, "q1").status_code == 200          # re-registering its own id: fine at the quota
    assert delete(b, "q0").status_code == 200
    assert register(b, "q3").status_code == 200
    assert speak(a, "r0").status_code == 200             # voices are usable by every key
    for vid, key in (("q1", 0), ("q2", 0), ("q3", 0), ("r0", 1)):
        assert delete(a, vid, KEYS[key]).status_code == 200
    assert listed(a) == []
