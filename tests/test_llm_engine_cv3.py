"""The LLM engine running CosyVoice3LM (CPU, tiny random CosyVoice3 model, reference kernels): every
piece's tokens equal CosyVoice3LM.inference (greedy and seeded, batched, prefix-cache hits), bistream
equals CosyVoice3LM.inference_bistream, both after the silent-token rule (drop_long_silences, per
piece), and text without <|endofprompt|> is refused up front.

The CosyVoice3 rules this checks: sos and task id are rows S and S + 2 of speech_embedding (no
llm_embedding), every id >= S ends a piece (200 of them), and during min_len only id S is masked,
as the official, so pieces may end early on the other stop ids (the tiny model does, often)."""
import copy
import random

import pytest
import torch

from light_tts.models.cosyvoice3 import CosyVoice3Model
from light_tts.models.token2wav import drop_long_silences
from test_bistream_engine import add, bistream_req, drive, feed, random_script, merge
from test_bistream_engine import reference as bistream_lm_reference
from test_llm_engine import assert_pool_free, engine, run
from test_llm_process import make_req, reference as lm_reference, text


@pytest.fixture(scope="module")
def lm(tiny_cv3_model_dir):
    return CosyVoice3Model.from_pretrained(tiny_cv3_model_dir, components=("llm",)).llm


def kept(lm, tokens):
    return list(drop_long_silences(tokens, lm.SILENT_TOKENS, lm.MAX_SILENT_RUN))


def reference(lm, req, greedy=False):
    """What the engine sends on: the plain model's tokens per piece, past the silent-token rule."""
    return [kept(lm, piece) for piece in lm_reference(lm, req, greedy)]


def bistream_reference(lm, req, all_text, greedy, eng):
    return kept(lm, bistream_lm_reference(lm, req, all_text, greedy, eng))


def prompt(lm):
    """Instruction ending in <|endofprompt|>, then the transcript (what the CosyVoice3 frontend sends)."""
    return (5, 6, lm.endofprompt_id, 7, 8)


def mixed_requests(lm):
    p = prompt(lm)
    return [make_req("a", [text(3), text(2, 300)], prompt_text=p, seed=1, max_speech_tokens=25),
            make_req("b", [text(7)], prompt_text=p, seed=2, max_speech_tokens=30, prompt_speech=()),
            make_req("c", [text(1)], prompt_text=p, seed=3),                     # ratio bound: 20 tokens
            make_req("d", [text(4), text(2)], prompt_text=p, seed=4, fixed_speech_tokens=9),
            make_req("e", [text(9), text(5, 200)], prompt_text=p, seed=5, max_speech_tokens=40),
            make_req("f", [[101, lm.endofprompt_id, 102]], prompt_text=(), seed=6, max_speech_tokens=12)]


@pytest.mark.parametrize("greedy", [True, False])
def test_engine_equals_cv3_inference(lm, greedy):
    """Requests of different lengths joining mid-flight, batched decode, prefix-cache hits, a fixed-length
    request (every one of the 200 stop ids masked) and pieces ended early by a stop id other than S."""
    reqs = mixed_requests(lm)
    eng = engine(lm, greedy=greedy)
    got, results, errors = run(eng, {0: reqs[:2], 3: reqs[2:4], 7: reqs[4:]})
    assert not errors
    for r in reqs:
        assert got[r.rid] == reference(lm, r, greedy), r.rid
    assert [len(p) for p in got["d"]] == [9, 9]
    # some piece ended within its min length (2 per text token): on a stop id other than S, as the official
    assert any(len(t) < 2 * len(p) for r in reqs if r.fixed_speech_tokens is None
               for t, p in zip(got[r.rid], r.text_pieces))
    assert max(r.batch_size for r in results if r.kind == "decode") >= 3
    assert eng.prefix.hits > 0
    assert_pool_free(eng)


def test_prefix_cache_hit_equals_miss(lm):
    reqs = lambda: [make_req(f"r{i}", [text(2 + i, 100 + 10 * i)], prompt_text=prompt(lm), seed=i,
                             max_speech_tokens=15) for i in range(4)]
    script = lambda: {0: reqs()[:1], 2: reqs()[1:2], 20: reqs()[2:]}
    eng = engine(lm)
    on, _, _ = run(eng, script())
    off, _, _ = run(engine(lm, prefix_cache_entries=0), script())
    assert on == off == {r.rid: reference(lm, r) for r in reqs()}
    assert eng.prefix.misses == 1 and eng.prefix.hits == 3


@pytest.mark.parametrize("greedy", [True, False])
def test_bistream_equals_cv3_reference(lm, greedy):
    """CosyVoice3's bistream rules (the instruction in the first input, fill = S + 3) from the model."""
    rng = random.Random(3)
    texts = {"b1": text(31, 200), "b2": text(17, 400)}
    reqs = {"b1": bistream_req("b1", seed=11, prompt_text=prompt(lm), max_speech_tokens=40),
            "b2": bistream_req("b2", seed=12, prompt_text=(lm.endofprompt_id,), prompt_speech=())}
    script = merge({0: [add(reqs["b1"])], 2: [add(reqs["b2"])]},
                   random_script(rng, "b1", texts["b1"], 0, 8), random_script(rng, "b2", texts["b2"], 3, 8))
    eng = engine(lm, greedy=greedy)
    got, _, errors = drive(eng, script)
    assert not errors
    for rid, req in reqs.items():
        assert got[rid] == bistream_reference(lm, req, texts[rid], greedy, eng), rid
    assert_pool_free(eng)


def test_text_without_endofprompt_is_refused(lm):
    eng = engine(lm)
    assert "endofprompt" in eng.check(make_req("u", [text(3)], prompt_text=(5, 6)))
    assert "endofprompt" in eng.check(bistream_req("b", seed=1, prompt_text=(5, 6)))
    assert eng.check(make_req("u", [text(3)], prompt_text=prompt(lm))) is None


@pytest.mark.parametrize("row", ["sos", "task_id"])
def test_comparison_detects_a_wrong_special_row(lm, row):
    """Negative control: the engine over a model whose sos (or task-id) row of speech_embedding is
    perturbed no longer matches the plain model, so the equality above does check those rows."""
    bad = copy.deepcopy(lm)
    with torch.no_grad():
        bad.speech_embedding.weight[getattr(bad, row)] += 1.0
    reqs = [make_req(f"r{i}", [text(4 + i)], prompt_text=prompt(lm), seed=i, fixed_speech_tokens=10)
            for i in range(3)]
    got, _, errors = run(engine(bad, greedy=True), {0: reqs})
    assert not errors
    assert [got[r.rid] for r in reqs] != [reference(lm, r, greedy=True) for r in reqs]
    assert [got[r.rid] for r in reqs] == [reference(bad, r, greedy=True) for r in reqs]


@pytest.fixture(scope="module")
def silent_lm(lm):
    """The model with a head that only scores silent token 1 (h . v) and silent token 2 (-h . v): greedy
    draws nothing else, so every run is longer than MAX_SILENT_RUN."""
    bad = copy.deepcopy(lm)
    v = torch.randn(bad.llm_decoder.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bad.llm_decoder.weight.zero_()
        bad.llm_decoder.weight[1], bad.llm_decoder.weight[2] = v, -v
    return bad


def test_silent_token_rule(silent_lm):
    """The LM is fed all 12 silent tokens of a piece; the first MAX_SILENT_RUN go out, the run count
    starting again at each piece and running over a whole bistream utterance."""
    lm = silent_lm
    req = make_req("u", [text(3), text(2)], prompt_text=prompt(lm), fixed_speech_tokens=12)
    b = bistream_req("b", seed=1, prompt_text=prompt(lm), max_speech_tokens=30)
    got, _, errors = drive(engine(lm, greedy=True), {0: [add(b), feed("b", text(12, 300), finish=True)]})
    plain = lm_reference(lm, req, greedy=True)
    assert all(len(p) == 12 and set(p) <= {1, 2} for p in plain)
    got_u, _, errors_u = run(engine(lm, greedy=True), {0: [req]})
    assert not errors and not errors_u
    assert got_u["u"] == [p[:lm.MAX_SILENT_RUN] for p in plain] == reference(lm, req, greedy=True)
    assert got["b"] == bistream_reference(lm, b, text(12, 300), True, None)
    assert len(got["b"]) == lm.MAX_SILENT_RUN
