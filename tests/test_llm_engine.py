"""LLM engine over the token-slot KV pool (CPU, tiny model, reference kernels): token equality with
Qwen2LM.inference, pool accounting, router policy, int8 KV, prefix cache, batched sampler."""
import pytest
import torch

from light_tts.kernels import dispatch, reference
from light_tts.models.cosyvoice2 import CosyVoice2Model
from light_tts.server.llm.engine import LLMEngine, TokenOutput
from light_tts.server.llm.mem_manager import KVPool, KVPoolFull
from light_tts.server.llm.model_runner import ModelRunner
from light_tts.server.llm.req_manager import ReqManager
from light_tts.server.llm.router import Load, estimated_peak
from test_llm_process import make_req, reference as plain_reference, text


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return CosyVoice2Model.from_pretrained(tiny_model_dir, components=("llm",)).llm


def engine(lm, **kw):
    args = dict(max_total_token_num=4096, max_req_total_len=1024, running_max_req_size=8, router_max_wait_tokens=2)
    args.update(kw)
    return LLMEngine(lm, **args)


def run(eng, arrive, max_steps=2000, on_step=None):
    """Feed requests at the given steps until all end; returns ({rid: [tokens per piece]}, results)."""
    got, results, errors = {}, [], {}
    for step in range(max_steps):
        for r in arrive.get(step, []):
            assert eng.check(r) is None
            eng.add(r)
            got[r.rid] = [[] for _ in r.text_pieces]
        if step > max(arrive) and not eng.running and not eng.waiting:
            break
        res = eng.step()
        results.append(res)
        for seq, msg, _ in res.errors:
            errors[seq.rid] = msg
        for o in res.outputs:
            got[o.rid][o.piece] += o.tokens
        if on_step:
            on_step(eng, res)
    else:
        raise AssertionError("engine did not finish")
    return got, results, errors


def assert_pool_free(eng):
    """Nothing held by requests; clearing the prefix cache returns every slot."""
    assert eng.kv_used() == 0 and eng.reqs.num_free == eng.reqs.max_reqs
    eng.prefix.clear()
    assert eng.pool.num_free == eng.pool.size and not eng.pool._in_use.any()


def mixed_requests():
    return [make_req("a", [text(3), text(2, 300)], seed=1, max_speech_tokens=25),
            make_req("b", [text(7)], seed=2, max_speech_tokens=30, prompt_speech=()),
            make_req("c", [text(1)], seed=3),                      # ratio bound: 20 tokens
            make_req("d", [text(4), text(0), text(2)], seed=4, fixed_speech_tokens=9),
            make_req("e", [text(5)], seed=5, max_speech_tokens=12, prompt_text=())]


def test_kernels_dispatch_to_reference_on_cpu():
    assert dispatch.kernel("decode_attention", "cpu") is reference.decode_attention


@pytest.mark.parametrize("greedy", [True, False])
def test_engine_equals_inference_with_staggered_arrivals(lm, greedy):
    """Greedy and seeded sampling: every piece's tokens equal Qwen2LM.inference (which the old
    plain-PyTorch engine also matched), with requests joining mid-flight and prefix-cache hits."""
    reqs = mixed_requests()
    eng = engine(lm, greedy=greedy)
    got, results, errors = run(eng, {0: reqs[:2], 3: reqs[2:4], 7: reqs[4:]})
    assert not errors
    for r in reqs:
        assert got[r.rid] == plain_reference(lm, r, greedy), r.rid
    assert [len(p) for p in got["d"]] == [9, 9, 9]
    assert max(r.batch_size for r in results if r.kind == "decode") >= 3
    assert eng.prefix.hits > 0
    assert_pool_free(eng)


def test_held_requests_skip_steps_and_keep_their_tokens(lm):
    """step(hold=rids) leaves those requests out of the decode step (no output, KV kept); new
    requests are admitted meanwhile; released, every request's tokens equal the reference."""
    reqs = mixed_requests()
    eng = engine(lm)
    got = {r.rid: [[] for _ in r.text_pieces] for r in reqs}
    for r in reqs[:2]:
        eng.add(r)
    held_steps = admitted_while_held = 0
    for step in range(2000):
        if step == 6:
            for r in reqs[2:]:
                eng.add(r)
        if step > 6 and not eng.running and not eng.waiting:
            break
        hold = {"a"} if 3 <= step < 40 else set()
        kv_a = next((s.seq_len for s in eng.running if s.rid == "a"), None)
        res = eng.step(hold=hold)
        for o in res.outputs:
            got[o.rid][o.piece] += o.tokens
        if hold and kv_a:
            assert "a" not in {o.rid for o in res.outputs}
            assert next(s.seq_len for s in eng.running if s.rid == "a") == kv_a   # KV kept, not grown
            held_steps += res.kind == "decode"
            admitted_while_held += len(res.admitted)
    else:
        raise AssertionError("engine did not finish")
    assert held_steps > 10 and admitted_while_held == 3
    for r in reqs:
        assert got[r.rid] == plain_reference(lm, r), r.rid
    assert_pool_free(eng)


def test_outputs_are_token_records(lm):
    """One TokenOutput per request and step: a token per step, the piece's last one marks it done,
    the request's last one marks it finished."""
    eng = engine(lm)
    eng.add(make_req("a", [text(2), text(1)], seed=1, fixed_speech_tokens=3))
    outs = []
    while eng.running or eng.waiting:
        outs += eng.step().outputs
    assert all(isinstance(o, TokenOutput) and o.rid == "a" and len(o.tokens) == 1 for o in outs)
    assert [(o.piece, o.piece_done, o.finished) for o in outs] == \
        [(0, False, False)] * 2 + [(0, True, False)] + [(1, False, False)] * 2 + [(1, True, True)]


def test_prefix_cache_hit_equals_miss(lm):
    reqs = lambda: [make_req(f"r{i}", [text(2 + i, 100 + 10 * i)], prompt_text=(5, 6, 7, 8, 9), seed=i,
                             max_speech_tokens=15) for i in range(4)]
    on, _, _ = run(engine(lm, greedy=True), {0: reqs()[:1], 2: reqs()[1:2], 20: reqs()[2:]})
    eng_off = engine(lm, greedy=True, prefix_cache_entries=0)
    off, _, _ = run(eng_off, {0: reqs()[:1], 2: reqs()[1:2], 20: reqs()[2:]})
    assert on == off
    assert eng_off.prefix.hits == eng_off.prefix.misses == 0
    eng = engine(lm, greedy=True)
    run(eng, {0: reqs()[:1], 2: reqs()[1:2], 20: reqs()[2:]})
    assert eng.prefix.misses == 1 and eng.prefix.hits == 3
    assert eng.stats()["prefix_hits"] == 3 and eng.stats()["kv_cached"] == 6  # sos + 5 prompt text tokens


def test_pool_returns_to_free_after_finish_abort_and_error(lm):
    eng = engine(lm)
    for rid in "abc":
        eng.add(make_req(rid, [text(3), text(2)], fixed_speech_tokens=30, seed=1))
    for _ in range(4):
        eng.step()
    assert eng.kv_used() > 0 and len(eng.running) == 3
    used = eng.kv_used()
    assert eng.abort("b").rid == "b" and eng.abort("zz") is None
    assert eng.kv_used() < used and [s.rid for s in eng.running] == ["a", "c"]
    # A failing forward fails the batch it ran (fault injected into the model runner), frees its KV.
    decode = eng.runner.decode
    eng.runner.decode = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    res = eng.step()
    eng.runner.decode = decode
    assert {s.rid for s, _, _ in res.errors} == {"a", "c"} and "boom" in res.errors[0][1]
    assert not eng.running
    assert_pool_free(eng)
    # Still serving afterwards; finished requests give everything back.
    got, _, errors = run(eng, {0: [make_req("d", [text(2)], seed=3, max_speech_tokens=10)]})
    assert not errors and got["d"] == plain_reference(lm, make_req("d", [text(2)], seed=3, max_speech_tokens=10))
    assert_pool_free(eng)


def test_admission_never_overcommits_tiny_pool(lm):
    """With the exact estimate (router_token_ratio 0) the pool never runs dry: no pauses, the peak
    estimate of the running set always fits, and everyone finishes with the right tokens."""
    reqs = [make_req(f"r{i}", [text(2 + i % 3), text(3)], seed=i, fixed_speech_tokens=8 + 2 * i) for i in range(6)]
    # a piece peaks at 2 + 3 + (2..4) + 4 + (8..18) = 19..31 tokens: 64 slots hold a few, never all six
    eng = engine(lm, max_total_token_num=64, max_req_total_len=40, batch_max_tokens=40)
    running_sizes = []

    def check(eng, res):
        assert eng.pool.num_used <= eng.pool.size and res.paused == 0
        assert eng.estimated_peak() <= eng.pool.size
        running_sizes.append(len(eng.running))
    got, _, errors = run(eng, {0: reqs}, on_step=check)
    assert not errors and eng.num_paused == 0
    for i, r in enumerate(reqs):
        assert [len(p) for p in got[r.rid]] == [8 + 2 * i] * 2
    assert 2 <= max(running_sizes) < len(reqs)
    assert_pool_free(eng)


def test_optimistic_admission_pauses_and_loses_nothing(lm):
    """router_token_ratio close to 1 admits by --router_max_new_token_len (optimistic): the pool
    overflows, requests are paused and resumed, and every token still arrives exactly once."""
    # 20 text tokens: eos is masked for 40 tokens and max_speech_tokens is 40, so exactly 40 each
    reqs = [make_req(f"r{i}", [text(20)], seed=i, max_speech_tokens=40) for i in range(4)]
    eng = engine(lm, max_total_token_num=100, max_req_total_len=70, batch_max_tokens=70, router_token_ratio=0.99,
                 router_max_new_token_len=2)
    got, results, errors = run(eng, {0: reqs})
    assert not errors and eng.num_paused > 0 and sum(r.paused for r in results) == eng.num_paused
    assert all([len(p) for p in got[r.rid]] == [40] for r in reqs)
    assert_pool_free(eng)


def test_batch_max_tokens_bounds_prefill(lm):
    reqs = [make_req(f"r{i}", [text(10)], seed=i, max_speech_tokens=3) for i in range(5)]  # 19-token prompts
    eng = engine(lm, batch_max_tokens=40, max_req_total_len=40)
    _, results, _ = run(eng, {0: reqs})
    prefills = [r for r in results if r.kind == "prefill"]
    assert all(r.prefill_tokens <= 40 for r in prefills)
    assert [r.prefills for r in prefills[:3]] == [2, 2, 1]


def test_router_max_wait_tokens(lm):
    """A request arriving while others decode is prefilled after router_max_wait_tokens decode steps."""
    eng = engine(lm, router_max_wait_tokens=5)
    eng.add(make_req("first", [text(3)], fixed_speech_tokens=30))
    assert eng.step().kind == "prefill"
    assert eng.step().kind == "decode"
    eng.add(make_req("late", [text(3)], fixed_speech_tokens=5))
    kinds = [eng.step().kind for _ in range(6)]
    assert kinds == ["decode"] * 4 + ["prefill", "decode"]
    assert len(eng.running) == 2


def prefill_then_decode(lm, int8=False, fuse=None):
    """Logits of a packed prefill of two requests (4 and 7 tokens) and one decode step of both, on
    a ModelRunner of its own (its pool full afterwards: a further alloc must fail)."""
    cfg = lm.llm.model.model.config
    pool = KVPool(13, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu", int8=int8)
    reqs = ReqManager(2, 32, pool.pad_slot, "cpu")
    runner = ModelRunner(lm, pool, reqs, fuse=fuse)
    if fuse is not None:
        assert (runner.fused_qkv is not None, runner.fused_gate_up is not None) == (fuse, fuse)
    if fuse:   # the fused weights are the model's own memory, not a second copy
        layer = lm.llm.model.model.layers[0]
        assert layer.self_attn.q_proj.weight.data_ptr() == runner.fused_qkv[0][0].data_ptr()
        assert layer.self_attn.v_proj.bias.data_ptr() > runner.fused_qkv[0][1].data_ptr()
        assert layer.mlp.up_proj.weight.data_ptr() > layer.mlp.gate_proj.weight.data_ptr() == \
            runner.fused_gate_up[0].data_ptr()
    x = torch.randn(11, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    rows, slots = [reqs.alloc(), reqs.alloc()], pool.alloc(11)
    reqs.write(rows[0], 0, slots[:4])
    reqs.write(rows[1], 0, slots[4:])
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)
    with torch.inference_mode():
        pre = runner.prefill(x, torch.cat((torch.arange(4), torch.arange(7))), slots, i32(rows), i32([0, 4]),
                             i32([4, 7]), i32([4, 7]), 7)
        dec = runner.decode(torch.tensor([3, 9]), i32(rows), i32([5, 8]), pool.alloc(2), 8)
    with pytest.raises(KVPoolFull):
        pool.alloc(1)
    return torch.cat((pre, dec))


def test_int8_kv_close_to_fp(lm):
    """Packed prefill + decode over the int8 pool stays close to the fp32 pool (not identical)."""
    outs = {int8: prefill_then_decode(lm, int8=int8) for int8 in (False, True)}
    torch.testing.assert_close(outs[True], outs[False], rtol=0.05, atol=0.05)
    assert not torch.equal(outs[True], outs[False])


def test_int8_engine_runs(lm):
    eng = engine(lm, int8_kv=True)
    got, _, errors = run(eng, {0: mixed_requests()[:3]})
    assert not errors and eng.pool.int8 and all(len(p) > 0 for p in got["a"])
    assert_pool_free(eng)


def test_batched_sampler_depends_on_seed_only(lm):
    """The batched (GPU default) sampler: a request's tokens do not depend on its batch-mates."""
    x = lambda seed: make_req("x", [text(4)], seed=seed, max_speech_tokens=15)
    alone, _, _ = run(engine(lm, sampler="batched"), {0: [x(7)]})
    crowd = [make_req(f"o{i}", [text(2 + i)], seed=i, max_speech_tokens=10) for i in range(3)]
    mixed, _, _ = run(engine(lm, sampler="batched"), {0: crowd, 4: [x(7)]})
    assert alone["x"] == mixed["x"] and len(alone["x"][0]) > 0
    other, _, _ = run(engine(lm, sampler="batched"), {0: [x(8)]})
    assert other["x"] != alone["x"]


def test_estimated_peak_matches_lightllm_formula():
    loads = [Load(10, 5), Load(20, 30), Load(5, 12)]
    # sorted by remaining length: 30, 12, 5 -> max(20 + 30, 25 + 2 * 12, 35 + 3 * 5)
    assert estimated_peak(loads) == max(20 + 30, 25 + 2 * 12, 35 + 3 * 5)
    assert estimated_peak([Load(10, 5, later=50, steps=20)]) == 50  # a later, larger piece


def test_fused_projections_equal_separate(lm):
    """The CUDA layout (one q/k/v GEMM, one gate/up GEMM + silu_mul), forced on here on the CPU,
    computes the same logits as the separate projections, prefill and decode."""
    outs = {fuse: prefill_then_decode(lm, fuse=fuse) for fuse in (False, True)}
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)


def test_sampler_draw_masks_and_ras():
    """Sampler.draw (the batched / in-graph sampler): the length flags mask eos / every stop token,
    RAS redraws a token already in the window, greedy takes the argmax of what is left."""
    from light_tts.server.llm.sampler import Sampler, SampleRow
    S = 20
    logits = torch.full((4, S + 3), -5.0)
    logits[:, S] = 10.0                       # eos by far the likeliest
    logits[:, S + 1] = 7.0                    # then another stop token
    logits[:, 7] = 4.0                        # then speech token 7
    rows = [SampleRow(decoded=[], ignore_eos=False, block_stops=False, seed=1),
            SampleRow(decoded=[], ignore_eos=True, block_stops=False, seed=2),
            SampleRow(decoded=[], ignore_eos=False, block_stops=True, seed=3),
            SampleRow(decoded=[1, 7], ignore_eos=False, block_stops=True, seed=4)]   # 7 in the window
    greedy = Sampler(S, top_p=0.8, top_k=25, win_size=10, tau_r=0.1, mode="batched", greedy=True)
    assert greedy.sample(logits, rows) == [S, S + 1, 7, 7]
    sampler = Sampler(S, top_p=0.8, top_k=25, win_size=10, tau_r=0.1, mode="batched")
    inputs = torch.from_numpy(sampler.inputs(rows))
    assert inputs.shape == (3 + 10, 4) and inputs[2].tolist() == [0, 1, 2, 2]
    assert inputs[3:, 3].tolist() == [-1] * 8 + [1, 7]
    for counter in range(20):
        for r in rows:
            r.counter = counter
        tokens = sampler.draw(logits, torch.from_numpy(sampler.inputs(rows))).tolist()
        assert tokens[0] == S and tokens[1] == S + 1 and tokens[2] == 7    # top-p keeps only the top token
        assert tokens[3] < S and tokens[3] != 7                             # 7 repeats: drawn again without it


def test_prefill_warm_up_leaves_nothing_behind(lm):
    """The start-up prefill warm-up (CUDA only by default) gives back every slot and row, skips
    shapes that do not fit, and the engine's tokens stay those of the reference afterwards."""
    eng = engine(lm)
    eng.warm_up_prefill(((1, 20), (3, 17), (100, 9), (1, 5000)))   # 100: as many as there are rows; 5000: skipped
    assert eng.pool.num_free == eng.pool.size and eng.reqs.num_free == eng.reqs.max_reqs
    reqs = mixed_requests()[:2]
    got, _, errors = run(eng, {0: reqs})
    assert not errors
    for r in reqs:
        assert got[r.rid] == plain_reference(lm, r)
    assert_pool_free(eng)
