"""Fuzzing the real server (tiny model, CPU), bounded to well under a minute:

1. schemathesis against the server's own OpenAPI schema: no 5xx, documented responses match it.
   The synthesis routes read the raw request (form, JSON or query, several client families), so
   the schema declares no bodies and this part mostly probes paths, methods and path parameters.
2. a hypothesis fuzzer of the bodies the schema cannot describe: random subsets of the synthesis
   fields as multipart or JSON, random bytes or truncated WAVs as audio, random strings and numbers
   in every field: never a 5xx, and every 4xx carries a JSON `detail` string.
"""
import base64
import json
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from server_util import PROMPT_TEXT, PROMPT_WAV, Server

pytestmark = pytest.mark.server   # starts server processes: not in the fast tier

PROMPT = open(PROMPT_WAV, "rb").read()
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with Server.api_server(tiny_model_dir, tmp_path_factory.mktemp("fuzz"), "--max_upload_bytes", "400000") as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=8, **SETTINGS)
def test_openapi_schema(case, server):
    case.call_and_validate(base_url=server.url, checks=[not_a_server_error, response_schema_conformance], timeout=60)


def test_schema_publishes_no_internal_parameters(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            names = [p["name"] for p in op.get("parameters", [])]
            assert all(not n.startswith("_") for n in names), (method, path, names)
    # a client cannot switch the mode of an endpoint through the query string
    r = httpx.post(server.url + "/inference_zero_shot?_mode=sft", data={"tts_text": "hi"})
    assert r.status_code == 400 and "prompt_wav" in r.json()["detail"], r.text


# ---- hypothesis: the bodies -----------------------------------------------------------------------

ENDPOINTS = ["/inference_zero_shot", "/inference_cross_lingual", "/inference_instruct2", "/inference_sft",
             "/v1/audio/speech", "/voices"]
short_text = st.text(max_size=40)
number_ish = st.one_of(st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True).map(str), short_text)
audio = st.one_of(st.just(PROMPT), st.binary(max_size=2000), st.integers(0, len(PROMPT)).map(lambda n: PROMPT[:n]),
                  st.binary(max_size=64).map(lambda b: b"RIFF" + b + PROMPT[8:200]))
fields = st.fixed_dictionaries({}, optional={
    "tts_text": st.one_of(short_text, st.just("Fuzz sentence.")),
    "prompt_text": st.one_of(short_text, st.just(PROMPT_TEXT)),
    "text": short_text, "instruct_text": short_text, "input": short_text,
    "voice_id": short_text, "spk_id": short_text, "voice": short_text,
    "speed": number_ish, "seed": number_ish, "stream": st.sampled_from(["true", "false", "1", "maybe", ""]),
    "format": st.sampled_from(["wav", "pcm", "mp3", ""]), "max_speech_tokens": number_ish,
    "prompt_wav": audio,
})


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)), **SETTINGS)  # FUZZ_EXAMPLES=1000 for a longer hunt
@given(endpoint=st.sampled_from(ENDPOINTS), body=fields, as_json=st.booleans(),
       tokens=st.one_of(st.integers(1, 12).map(str), number_ish), raw_b64=st.booleans())
def test_fuzz_bodies(server, endpoint, body, as_json, tokens, raw_b64):
    # every request asks for a few speech tokens at most, so an accepted one costs little
    body = {**body, "fixed_speech_tokens": tokens}
    wav = body.pop("prompt_wav", None)
    if as_json:
        if wav is not None:
            body["prompt_wav"] = wav.decode("latin-1") if raw_b64 else base64.b64encode(wav).decode()
        r = httpx.post(server.url + endpoint, content=json.dumps(body), timeout=120,
                       headers={"content-type": "application/json"})
    else:
        files = {"prompt_wav": ("p.wav", wav, "audio/wav")} if wav is not None else None
        r = httpx.post(server.url + endpoint, data=body, files=files, timeout=120)
    assert r.status_code < 500, (endpoint, body, r.status_code, r.text[:300])
    if 400 <= r.status_code < 500:
        assert isinstance(r.json().get("detail"), str) and r.json()["detail"], (endpoint, body, r.text[:300])
    else:
        assert r.status_code == 200, (r.status_code, r.text[:300])
