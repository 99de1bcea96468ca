"""CosyVoice3 on the plain reference pipeline: the CLI and synthesize_piece, the official streaming
schedule with the causal vocoder step (the official re-vocodes all mel per chunk and slices off the
emitted samples; ours decodes a bounded window with the same samples),
and the official silent-token rule. CPU, a tiny random CosyVoice3 directory written once."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from light_tts.frontend.frontend import Frontend
from light_tts.models.pretrained import load_model
from light_tts.models.token2wav import (CausalVocoder, CrossFadeVocoder, StreamingDecoder, StreamSchedule, Token2Wav,
                                        drop_long_silences, stream_chunks)
from light_tts.synthesize import main, synthesize, synthesize_piece
from light_tts.tools.make_random_model import make_random_model

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PROMPT_WAV = os.path.join(FIXTURES, "prompt_en.wav")
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog."
TEXT = "Hello there, this is a test."
SAMPLES_PER_TOKEN = 960                     # 2 mel frames of 480 samples at 24 kHz
# official cosyvoice/cli/model.py CosyVoice3Model.__init__ and llm_job (ace7c47)
OFFICIAL_SILENT_TOKENS = [1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323]


@pytest.fixture(scope="module")
def cv3_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cv3") / "tiny")
    make_random_model(out, "tiny", seed=0, log=lambda *a, **k: None, family="cosyvoice3")
    return out


@pytest.fixture(scope="module")
def setup(cv3_dir):
    model = load_model(cv3_dir)
    fe = Frontend(cv3_dir)
    voice = fe.encode_voice(open(PROMPT_WAV, "rb").read(), PROMPT_TEXT)
    return model, fe, voice


@pytest.fixture(scope="module")
def voiced(cv3_dir):
    """flow + hift of the same directory, the HiFT's F0 head moved into a speech range: the random
    F0 head leaves every frame unvoiced, and then the audio hardly depends on the mel (an
    equality test would prove little)."""
    model = load_model(cv3_dir, components=("flow", "hift"))
    with torch.no_grad():
        head = model.hift.f0_predictor.classifier
        head.weight.mul_(300.0)
        head.bias.fill_(150.0)
    return model


def _conditioning(seed=1, prompt_tokens=37):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 6561, (prompt_tokens,), generator=g), torch.randn(2 * prompt_tokens, 80, generator=g),
            torch.randn(192, generator=g))


def _tokens(n, seed=3):
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _t2w(model, conditioning, **kw):
    return Token2Wav(model.flow, model.hift, *conditioning, StreamSchedule(pre_lookahead_len=model.flow.pre_lookahead_len),
                     **kw)


# ---- the CLI and synthesize_piece ---------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_cli_writes_24k_mono_pcm16(cv3_dir, tmp_path, capsys, stream):
    out = tmp_path / "out.wav"
    argv = ["--model_dir", cv3_dir, "--prompt_wav", PROMPT_WAV, "--prompt_text", PROMPT_TEXT,
            "--tts_text", TEXT, "--out", str(out), "--max_speech_tokens", "90"] + (["--stream"] if stream else [])
    assert main(argv) == 0
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames > 0 and info.frames % SAMPLES_PER_TOKEN == 0
    printed = capsys.readouterr().out
    assert "loaded CosyVoice3" in printed and "RTF" in printed
    assert ("chunk 0:" in printed) == stream


def test_cli_modes(cv3_dir, tmp_path):
    for mode, extra in (("cross_lingual", []), ("instruct2", ["--instruct_text", "Speak slowly."])):
        out = tmp_path / f"{mode}.wav"
        assert main(["--model_dir", cv3_dir, "--prompt_wav", PROMPT_WAV, "--tts_text", TEXT, "--out", str(out),
                     "--mode", mode, "--max_speech_tokens", "40", "--stream"] + extra) == 0
        assert sf.info(str(out)).frames > 0


@pytest.mark.parametrize("stream", [False, True])
def test_same_seed_same_audio(setup, stream):
    model, fe, voice = setup
    ids = fe.tokenize("A short sentence to speak.")
    prompt = fe.lm_prompt("zero_shot", voice)
    run = lambda seed: list(synthesize_piece(model, voice, ids, lm_prompt=prompt, seed=seed, stream=stream,
                                             fixed_speech_tokens=60))
    a, b, c = run(7), run(7), run(8)
    assert len(a) == (2 if stream else 1)  # first hop 43 (82 prompt tokens: 25 + 18) + 3 lookahead, then the rest
    assert all(x.dtype == np.float32 and x.ndim == 1 for x in a)
    joined = np.concatenate(a)
    assert len(joined) == 60 * SAMPLES_PER_TOKEN and np.isfinite(joined).all() and np.abs(joined).max() > 0
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not np.array_equal(joined, np.concatenate(c))


def test_modes_use_the_frontends_prompt(setup):
    model, fe, voice = setup
    kw = dict(seed=7, max_speech_tokens=40)
    zero = np.concatenate(list(synthesize(model, fe, TEXT, voice, **kw)))
    for mode, extra in (("cross_lingual", {}), ("instruct2", {"instruct_text": "Speak slowly."})):
        audio = np.concatenate(list(synthesize(model, fe, TEXT, voice, mode=mode, **extra, **kw)))
        assert len(audio) > 0 and not (audio.shape == zero.shape and np.array_equal(audio, zero))
    # Without the frontend's prompt, CosyVoice3 cross_lingual lacks the system prompt the LM requires.
    with pytest.raises(ValueError, match="endofprompt"):
        list(synthesize_piece(model, voice, fe.tokenize(TEXT), mode="cross_lingual", max_speech_tokens=5))


def test_speed_only_without_streaming(setup):
    model, fe, voice = setup
    ids, prompt = fe.tokenize(TEXT), fe.lm_prompt("zero_shot", voice)
    kw = dict(lm_prompt=prompt, seed=7, fixed_speech_tokens=40)
    fast = np.concatenate(list(synthesize_piece(model, voice, ids, speed=2.0, **kw)))
    assert len(fast) == 40 * SAMPLES_PER_TOKEN // 2
    with pytest.raises(ValueError, match="without streaming"):
        list(synthesize_piece(model, voice, ids, speed=2.0, stream=True, **kw))


# ---- the streaming schedule and the causal vocoder step -----------------------------------------

def test_vocoder_step_is_chosen_by_family(setup, tiny_model_dir):
    model, _, _ = setup
    assert isinstance(_t2w(model, _conditioning()).vocoder, CausalVocoder)
    assert isinstance(_t2w(model, _conditioning(), family="cosyvoice3").vocoder, CausalVocoder)
    cv2 = load_model(tiny_model_dir, components=("flow", "hift"))
    assert isinstance(_t2w(cv2, _conditioning()).vocoder, CrossFadeVocoder)
    with pytest.raises(ValueError, match="unknown model family"):
        _t2w(model, _conditioning(), family="cosyvoice1")


def test_chunk_lengths_follow_the_official_schedule(voiced):
    cond = _conditioning(prompt_tokens=37)    # first hop 25 + 13 (37 -> 50), then 50, 100, ...
    chunks = list(stream_chunks(iter(_tokens(150)), _t2w(voiced, cond), stream=True))
    # a non-final chunk re-vocodes all mel so far; the causal HiFT holds back its last 8 frames
    # (3 F0 lookahead + 4 conv_pre lookahead + 1 iSTFT overlap), the next chunk sends them
    assert [len(c) for c in chunks] == [(38 * 2 - 8) * 480, 50 * 960, 150 * 960 - (38 + 50) * 960 + 8 * 480]


def test_streamed_audio_is_one_causal_hift_pass_over_all_mel(voiced):
    """What the official schedule guarantees: chunk k's samples are the samples at the same place
    of the causal HiFT run once, finalize=True, over the whole mel the chunks produced."""
    t2w = _t2w(voiced, _conditioning())
    decoder = StreamingDecoder(t2w, stream=True)
    chunks, prefixes = [], []
    for i, token in enumerate(_tokens(230)):
        for c in decoder.push((token,)):
            chunks.append(c)
            # the mel so far, vocoded now as if it were the end: the samples sent agree with it
            with torch.inference_mode():
                prefix, _ = voiced.hift.inference(t2w.vocoder.mel, finalize=True)
            prefixes.append(prefix[0].numpy())
    chunks += decoder.finish()
    assert len(chunks) == 4 and len(prefixes) == 3
    with torch.inference_mode():
        full, _ = voiced.hift.inference(t2w.vocoder.mel, finalize=True)
        bumped, _ = voiced.hift.inference(t2w.vocoder.mel * 1.01, finalize=True)
    full = full[0].numpy()
    joined = np.concatenate(chunks)
    assert len(joined) == len(full) == 230 * SAMPLES_PER_TOKEN
    start = 0
    for k, c in enumerate(chunks):
        np.testing.assert_allclose(c, full[start:start + len(c)], rtol=0, atol=1e-6, err_msg=f"chunk {k}")
        start += len(c)
    for k, prefix in enumerate(prefixes):
        sent = sum(len(c) for c in chunks[:k + 1])
        np.testing.assert_allclose(joined[:sent], prefix[:sent], rtol=0, atol=1e-6)
    # the tolerance is meaningful: the same HiFT on slightly different mel is far outside it
    assert np.abs(bumped[0].numpy() - joined).max() > 1e-4


@pytest.mark.parametrize("context", [CausalVocoder.CONTEXT_FRAMES, 0])
def test_bounded_vocoder_decodes_a_window_with_the_same_samples(voiced, context):
    """Each chunk decodes at most `context` frames (plus the bucket rounding) before its first new
    sample (flat cost in the sentence's length) and gives the official schedule's samples
    (re-vocoding all mel so far: context_frames=None); a context shorter than the network's
    receptive field changes them."""
    cond, tokens = _conditioning(), _tokens(330, seed=6)
    official = _t2w(voiced, cond)
    official.vocoder.context_frames = None
    want = list(stream_chunks(iter(tokens), official, stream=True))
    bounded = _t2w(voiced, cond)
    bounded.vocoder.context_frames = context
    decoded = []
    window = bounded.vocoder.window

    def recording(*a, **k):
        w = window(*a, **k)
        decoded.append((w.mel.shape[2], w.skip))
        return w
    bounded.vocoder.window = recording
    got = list(stream_chunks(iter(tokens), bounded, stream=True))
    assert len(got) == len(want) == 5 and [len(c) for c in got] == [len(c) for c in want]
    spf, bucket = voiced.hift.samples_per_frame, CausalVocoder.WINDOW_BUCKET
    # every window is a bucket long (padded on the right, or the final one extended to the left); a
    # chunk after the first starts its window `context` frames before its first new sample, the
    # final one up to a bucket earlier
    assert all(frames % bucket == 0 for frames, _ in decoded)
    assert all(skip == context * spf for _, skip in decoded[1:-1])
    assert context * spf <= decoded[-1][1] < (context + bucket) * spf
    new_frames = [len(c) // spf for c in got]
    assert all(frames < context + new + voiced.hift.right_context + bucket
               for (frames, _), new in zip(decoded[1:], new_frames[1:]))
    # the start's warm-up runs the decode network at every one of these lengths
    assert all(frames in range(bucket, 289, bucket) for frames, _ in decoded)
    err = max(np.abs(a - b).max() for a, b in zip(got, want))
    if context == CausalVocoder.CONTEXT_FRAMES:
        assert err <= 1e-6
    else:
        assert err > 1e-4   # the equality above is not vacuous


def test_vocoder_warm_up_runs_the_bucket_shapes(voiced):
    hift = voiced.hift
    calls = CausalVocoder.warm_up(hift, torch.device("cpu"), next(hift.parameters()).dtype, max_window=96, max_f0=128)
    assert calls == 2 * (3 + 2)   # windows of 32, 64, 96 frames and F0 over 64, 128, finalizing or not


def test_streaming_chunks_depend_only_on_tokens_so_far(voiced):
    cond, tokens = _conditioning(), _tokens(230, seed=4)
    short = list(stream_chunks(iter(tokens[:100]), _t2w(voiced, cond), stream=True))
    long = list(stream_chunks(iter(tokens), _t2w(voiced, cond), stream=True))
    assert np.array_equal(short[0], long[0]) and np.array_equal(short[1], long[1])
    # short's third chunk is its final one (flow without chunk masks): not long's third
    n = min(len(short[2]), len(long[2]))
    assert len(short) == 3 and len(long) == 4 and not np.array_equal(short[2][:n], long[2][:n])


def test_streaming_differs_from_offline_only_through_the_flow(voiced):
    # The final chunk and the non-streaming call run the flow without chunk masks; the streamed
    # chunks before it use them (official design), so the two renderings differ, at equal length.
    cond, tokens = _conditioning(), _tokens(160)
    offline = list(stream_chunks(iter(tokens), _t2w(voiced, cond), stream=False))
    streamed = np.concatenate(list(stream_chunks(iter(tokens), _t2w(voiced, cond), stream=True)))
    assert len(offline) == 1 and len(offline[0]) == len(streamed) == 160 * SAMPLES_PER_TOKEN
    assert not np.array_equal(offline[0], streamed)


# ---- the silent-token rule ----------------------------------------------------------------------

def _official_llm_job(tokens, silent_tokens=OFFICIAL_SILENT_TOKENS):
    """The rule of the official CosyVoiceModel.llm_job (inherited by CosyVoice3Model), restated."""
    kept, cur, max_run = [], 0, 5
    for i in tokens:
        if i in silent_tokens:
            cur += 1
            if cur > max_run:
                continue
        else:
            cur = 0
        kept.append(i)
    return kept


@pytest.mark.parametrize("tokens, expected", [
    ([1] * 7, [1] * 5),                                             # a run keeps its first 5
    ([1] * 5, [1] * 5),                                             # exactly 5: all kept
    ([1, 2, 28, 29, 55, 248, 494, 2241], [1, 2, 28, 29, 55]),       # any mix of silent ids is one run
    ([1] * 6 + [100] + [2] * 6, [1] * 5 + [100] + [2] * 5),         # a speech token ends the run
    ([7, 2322, 2323, 2322, 2323, 2322, 2323, 2322, 8, 1], [7, 2322, 2323, 2322, 2323, 2322, 8, 1]),
    ([3, 4, 5], [3, 4, 5]),
    ([], []),
])
def test_drop_long_silences_cases(tokens, expected):
    assert _official_llm_job(tokens) == expected
    assert list(drop_long_silences(iter(tokens), OFFICIAL_SILENT_TOKENS, 5)) == expected


def test_drop_long_silences_matches_the_official_loop_on_random_streams():
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor(OFFICIAL_SILENT_TOKENS + [0, 3, 6560])
    for _ in range(50):
        tokens = pool[torch.randint(0, len(pool), (200,), generator=g)].tolist()
        assert list(drop_long_silences(tokens, OFFICIAL_SILENT_TOKENS, 5)) == _official_llm_job(tokens)
    assert list(drop_long_silences([1] * 9, (), 5)) == [1] * 9     # CosyVoice2: no silent tokens


def test_the_pipeline_applies_the_rule_lazily(setup, monkeypatch):
    model, fe, voice = setup
    assert list(model.llm.SILENT_TOKENS) == OFFICIAL_SILENT_TOKENS and model.llm.MAX_SILENT_RUN == 5
    drawn = _tokens(60) + [1] * 20 + _tokens(40, seed=5)        # 15 of the 20 silent tokens go
    seen = []

    def fixed_inference(*a, **k):
        for t in drawn:
            seen.append(t)
            yield t
    monkeypatch.setattr(model.llm, "inference", fixed_inference)
    audio = list(synthesize_piece(model, voice, fe.tokenize(TEXT), lm_prompt=fe.lm_prompt("zero_shot", voice),
                                  stream=True))
    assert sum(map(len, audio)) == (len(drawn) - 15) * SAMPLES_PER_TOKEN and seen == drawn
    # lazily: the filter yields as the LM does (the first chunk needs only the first 43 + 3 tokens)
    stream = drop_long_silences(iter(drawn), model.llm.SILENT_TOKENS, model.llm.MAX_SILENT_RUN)
    assert [next(stream) for _ in range(3)] == drawn[:3]
