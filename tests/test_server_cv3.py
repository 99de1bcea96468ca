"""CosyVoice3 served end to end (subprocess server, tiny CosyVoice3 model, CPU): zero-shot in both
response modes, instruct2, transcripts with and without `<|endofprompt|>`, /query_tts_model; and
the decode engine build_engine gives a CosyVoice3 model, one request against the reference (batches
of requests: tests/test_decode_engine.py)."""
import httpx
import numpy as np
import pytest
import torch

from light_tts.models.pretrained import load_model
from light_tts.models.token2wav import StreamingDecoder, Token2Wav, stream_chunks
from light_tts.server.decode.engine import DecodeEngine, build_engine

from server_util import PROMPT_TEXT, PROMPT_WAV, Server, wav_info

PROMPT = open(PROMPT_WAV, "rb").read()
N = 30                        # speech tokens per request: 60 mel frames (token_mel_ratio 2)
SAMPLES = N * 960             # 24 kHz samples for N tokens (480 per mel frame)


@pytest.fixture(scope="module")
def server(tiny_cv3_model_dir, tmp_path_factory):   # the `server` fixture: this test is in the server tier
    with Server.api_server(tiny_cv3_model_dir, tmp_path_factory.mktemp("srv3")) as srv:
        yield srv


def post(url, path, tokens=N, stream=False, **data) -> tuple[int, list]:
    """(status, the body's chunks as they arrived)."""
    with httpx.stream("POST", url + path, timeout=300, files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")},
                      data={"fixed_speech_tokens": str(tokens), "stream": str(stream).lower(), **data}) as r:
        return r.status_code, [c for c in r.iter_raw() if c]


def test_health_and_model_family(server):
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/query_tts_model").json() == {"tts_models": ["tiny"], "model_family": "cosyvoice3"}


@pytest.mark.parametrize("prompt_text", [PROMPT_TEXT, "You are a helpful assistant.<|endofprompt|>" + PROMPT_TEXT])
def test_zero_shot_wav(server, prompt_text):
    """A CosyVoice2-style transcript (no marker: the frontend adds the default system prompt) and an
    official CosyVoice3 one both speak."""
    status, chunks = post(server.url, "/inference_zero_shot", prompt_text=prompt_text, tts_text="Hello there.")
    assert status == 200, chunks
    assert wav_info(b"".join(chunks)) == (24000, 1, 16, SAMPLES * 2)


def test_zero_shot_streaming(server):
    status, chunks = post(server.url, "/inference_zero_shot", 80, True, prompt_text=PROMPT_TEXT,
                          tts_text="Streaming test, please.")
    assert status == 200, chunks
    assert len(b"".join(chunks)) == 80 * 960 * 2 and len(chunks) >= 2   # raw PCM16, more than one chunk


def test_instruct2(server):
    status, chunks = post(server.url, "/inference_instruct2", tts_text="Instructed speech.",
                          instruct_text="Speak slowly.")
    assert status == 200, chunks
    assert wav_info(b"".join(chunks))[3] == SAMPLES * 2


@pytest.mark.parametrize("stream", [False, True])
def test_decode_engine_is_the_reference_pipeline(tiny_cv3_model_dir, stream):
    """build_engine gives a CosyVoice3 flow the batched engine with the per-row causal vocoder (no
    prompt cache: it is CosyVoice2's); chunk by chunk it returns what stream_chunks returns."""
    model = load_model(tiny_cv3_model_dir, components=("flow", "hift"))
    engine = build_engine(model.flow, model.hift, "cpu", prompt_cache_gb=1.0, stream_cache=True)
    assert isinstance(engine, DecodeEngine) and engine.hift is None and engine.prompt_cache is None
    g = torch.Generator().manual_seed(1)
    conditioning = (torch.randint(0, 6561, (37,), generator=g), torch.randn(74, 80, generator=g),
                    torch.randn(192, generator=g))
    tokens = torch.randint(0, 6561, (90,), generator=g).tolist()
    expected = list(stream_chunks(iter(tokens), Token2Wav(model.flow, model.hift, *conditioning, seed=0), stream))
    t2w = Token2Wav(model.flow, model.hift, *conditioning, seed=0)
    decoder = StreamingDecoder(t2w, stream)
    decoder.feed(tokens)
    decoder.end()
    got = []
    while decoder.ready:
        [audio] = engine.run([(t2w, decoder.next_chunk())])
        got.append(audio)
    assert len(got) == len(expected) == (2 if stream else 1)   # first hop 38 (37 prompt tokens) + 3, then the rest
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
