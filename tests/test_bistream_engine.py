"""Bistream in the LLM engine (CPU, tiny model): tokens equal the plain reference
Qwen2LM.inference_bistream whatever the text chunking and timing, a request waiting for text
stays out of the batch, abort and length limits free everything."""
import random

import pytest

from light_tts.models.bistream import BistreamPolicy
from light_tts.models.cosyvoice2 import CosyVoice2Model
from test_llm_engine import assert_pool_free, engine
from test_llm_process import make_req, text


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return CosyVoice2Model.from_pretrained(tiny_model_dir, components=("llm",)).llm


def bistream_req(rid, *, seed, prompt_text=(5, 6, 7), prompt_speech=tuple(range(11, 31)), max_speech_tokens=None):
    req = make_req(rid, [], prompt_text=prompt_text, prompt_speech=prompt_speech, seed=seed,
                   max_speech_tokens=max_speech_tokens)
    req.bistream = True
    return req


def reference(lm, req, all_text, greedy, eng):
    seq_cap = max(1, int(20 * len(all_text)))
    if req.max_speech_tokens is not None:
        seq_cap = min(seq_cap, req.max_speech_tokens)
    chunks = [all_text[i:i + 5] for i in range(0, len(all_text), 5)]
    return list(lm.inference_bistream(chunks, req.prompt_text_ids.tolist(), req.prompt_speech_tokens.tolist(),
                                      seed=req.seed, greedy=greedy, max_final_tokens=seq_cap))


def drive(eng, script, max_steps=3000):
    """script: {step: [callable(eng)]}; runs until nothing is left. Returns ({rid: tokens}, results, errors)."""
    got, results, errors = {}, [], {}
    last = max(script)
    for step in range(max_steps):
        for action in script.get(step, []):
            action(eng, got)
        if step > last and not eng.running and not eng.waiting:
            break
        res = eng.step()
        results.append(res)
        for seq, msg, status in res.errors:
            errors[seq.rid] = (status, msg)
        for o in res.outputs:
            got.setdefault(o.rid, []).extend(o.tokens)
    else:
        raise AssertionError("engine did not finish")
    return got, results, errors


def add(req):
    def action(eng, got):
        assert eng.check(req) is None
        eng.add(req)
        got.setdefault(req.rid, [])
    return action


def feed(rid, tokens, finish=False):
    return lambda eng, got: eng.add_text(rid, tokens, finish)


def random_script(rng, rid, all_text, start, spread):
    """Text in random chunks (1-7 tokens) at random steps after `start`, finish after the last."""
    script, i, step = {}, 0, start
    while i < len(all_text):
        n = rng.randint(1, 7)
        step += rng.randint(0, spread)
        script.setdefault(step, []).append(feed(rid, all_text[i:i + n]))
        i += n
    script.setdefault(step + rng.randint(0, spread), []).append(feed(rid, [], finish=True))
    return script


def merge(*scripts):
    out = {}
    for s in scripts:
        for k, v in s.items():
            out.setdefault(k, []).extend(v)
    return out


@pytest.mark.parametrize("greedy", [True, False])
def test_bistream_equals_reference_any_chunking(lm, greedy):
    """Three bistream requests (prompt speech, no prompt, prompt text only) with text trickling in at
    random times, beside two ordinary requests: every request's tokens equal its plain reference."""
    rng = random.Random(7)
    eng = engine(lm, greedy=greedy)
    texts = {"b1": text(37, 200), "b2": text(23, 400), "b3": text(12, 600)}
    reqs = {"b1": bistream_req("b1", seed=11, max_speech_tokens=40),
            "b2": bistream_req("b2", seed=12, prompt_text=(), prompt_speech=()),
            "b3": bistream_req("b3", seed=13, prompt_speech=(), max_speech_tokens=25)}
    plain = [make_req("u1", [text(4)], seed=3, max_speech_tokens=30), make_req("u2", [text(6)], seed=4,
                                                                             max_speech_tokens=50)]
    script = merge({0: [add(reqs["b1"]), add(plain[0])], 2: [add(reqs["b2"])], 5: [add(reqs["b3"]), add(plain[1])]},
                   random_script(rng, "b1", texts["b1"], 0, 12), random_script(rng, "b2", texts["b2"], 3, 20),
                   random_script(rng, "b3", texts["b3"], 6, 3))
    got, results, errors = drive(eng, script)
    assert not errors
    for rid, req in reqs.items():
        ref = reference(lm, req, texts[rid], greedy, eng)
        assert got[rid] == ref, rid
        assert len(ref) > 15
    from test_llm_process import reference as unistream_reference
    for r in plain:
        assert got[r.rid] == unistream_reference(lm, r, greedy)[0]
    assert_pool_free(eng)


def test_waiting_request_does_not_block_others(lm):
    """A bistream request that never gets enough text sits in the running set holding its KV while an
    ordinary request decodes to its end; it is in no forward meanwhile."""
    eng = engine(lm, greedy=True)
    b = bistream_req("b", seed=1, prompt_text=(), prompt_speech=())
    u = make_req("u", [text(5)], seed=2, fixed_speech_tokens=40)
    eng.add(b)
    eng.add(u)
    eng.add_text("b", text(3), finish=False)      # fewer than 5 text tokens: it must wait
    sizes, got_u = [], []
    for _ in range(60):
        res = eng.step()
        sizes.append(res.batch_size)
        got_u += [t for o in res.outputs if o.rid == "u" for t in o.tokens]
        assert not [o for o in res.outputs if o.rid == "b"]
        if not any(s.rid == "u" for s in eng.running):
            break
    assert len(got_u) == 40 and max(sizes) == 1
    seq = eng.find("b")
    assert seq is not None and not seq.decoding and not seq.needs_prefill and seq.policy.waiting
    assert eng.kv_used() == 0                     # nothing fed yet: it holds no slots
    eng.add_text("b", text(2, 300), finish=False)  # 5 tokens now: it runs
    assert eng.step().kind == "prefill" and eng.find("b").seq_len > 0
    held = eng.kv_used()
    for _ in range(40):
        if eng.step().kind == "idle":
            break
    assert eng.find("b").policy.waiting and eng.kv_used() > held   # waiting after a fill, KV kept
    assert eng.abort("b") is not None
    assert_pool_free(eng)


def test_bistream_limit_is_413_and_frees(lm):
    eng = engine(lm, greedy=True, bistream_max_len=60)
    b = bistream_req("b", seed=1)
    got, results, errors = drive(eng, {0: [add(b), feed("b", text(40))]})
    assert errors["b"][0] == 413 and "--bistream_max_len" in errors["b"][1]
    assert_pool_free(eng)


def test_bistream_request_checks(lm):
    eng = engine(lm, bistream_max_len=40)
    assert "bistream_max_len" in eng.check(bistream_req("a", seed=0, prompt_speech=tuple(range(40))))
    r = bistream_req("b", seed=0)
    r.fixed_speech_tokens = 5
    assert "fixed_speech_tokens" in eng.check(r)
    assert eng.add_text("nobody", [1, 2], True) is False


def test_paused_bistream_resumes_with_same_tokens(lm):
    """With the optimistic estimate the pool runs out; paused bistream requests replay what they had
    fed and go on with exactly the tokens they would have produced."""
    texts = {f"b{i}": text(30, 200 + 40 * i) for i in range(4)}
    reqs = {rid: bistream_req(rid, seed=i, max_speech_tokens=60) for i, rid in enumerate(texts)}
    eng = engine(lm, greedy=False, max_total_token_num=330, max_req_total_len=300, router_token_ratio=0.99,
                 router_max_new_token_len=1, bistream_max_len=300)
    script = merge({0: [add(r) for r in reqs.values()]},
                   *[{1: [feed(rid, t, finish=True)]} for rid, t in texts.items()])
    got, results, errors = drive(eng, script)
    assert not errors and eng.num_paused > 0
    for rid, req in reqs.items():
        assert got[rid] == reference(lm, req, texts[rid], False, eng), rid
    assert_pool_free(eng)


def test_policy_schedule_matches_official_counts():
    """Prompt of 20 speech tokens: 2 groups of 5 text + 15/5 speech need 10 text tokens (3 from the
    prompt transcript); the first run ends with a fill after 10 speech tokens (so 15 x 2 = 30 with the
    prompt's), every later run after 15."""
    p = BistreamPolicy([1, 2, 3], list(range(20)), speech_token_size=100)
    p.add_text([7] * 6)
    assert p.waiting and not p.has_input                  # 9 text tokens: one group short
    p.add_text([8])
    items = p.next_input()
    assert [k for k, _ in items].count("text") == 10 and [k for k, _ in items].count("speech") == 20
    n = 0
    while (tok := p.forced_token()) is None:
        assert p.on_token(5) == "speech"
        p.next_input()
        n += 1
    assert n == 10 and tok == 102 and p.on_token(tok) == "wait"
    p.add_text([9] * 5)
    assert [k for k, _ in p.next_input()] == ["text"] * 5
    n = 0
    while p.forced_token() is None:
        p.on_token(5)
        p.next_input()
        n += 1
    assert n == 15
    p.on_token(102)
    p.finish()
    items = p.next_input()                                # the official re-feeds the last input
    assert items[0] == ("speech", 5) and items[-1] == ("task", 0) and p.final and p.ignore_eos is False
    assert p.on_token(100) == "end" and p.done
