"""CosyVoice2 speech LM: Qwen2 body, KV cache, state-dict keys, sampling, generation rules."""
import pytest
import torch

from light_tts.models.config import Qwen2Config
from light_tts.models.llm import Qwen2LM
from light_tts.models.qwen2 import Qwen2ForCausalLM
from light_tts.models import sampling

# The tiny model's ops are microseconds long: thread hand-off costs more than it saves.
pytestmark = pytest.mark.usefixtures("one_thread")

S = 6561  # speech vocabulary (eos = S; S + 1, S + 2 are the other stop tokens)
# theta differs from the default 1e6 so a body that ignored the config would fail the reference test.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, rope_theta=10000.0, rms_norm_eps=1e-6)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights that exercise every parameter (norm weights and biases not at their init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if name.endswith("bias") else 0.15))


def tiny_lm(seed: int = 0) -> Qwen2LM:
    cfg = Qwen2Config(**TINY)
    lm = Qwen2LM(64, 64, S, cfg, mix_ratio=[5, 15], length_normalized_loss=True, lsm_weight=0,
                 sampling={"top_p": "0.8", "top_k": 25, "win_size": 10, "tau_r": 0.1})
    _randomize(lm, seed)
    return lm.eval()


# ---- (3) state-dict keys --------------------------------------------------------------------

def expected_keys(num_layers: int = 2) -> dict:
    h, kv, ffn, v = 64, 2 * 16, 128, TINY["vocab_size"]
    keys = {"llm_embedding.weight": (2, h), "llm.model.model.embed_tokens.weight": (v, h)}
    for i in range(num_layers):
        p = f"llm.model.model.layers.{i}."
        keys.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    keys.update({"llm.model.model.norm.weight": (h,), "llm.model.lm_head.weight": (v, h),
                 "llm_decoder.weight": (S + 3, h), "llm_decoder.bias": (S + 3,),
                 "speech_embedding.weight": (S + 3, h)})
    return keys


def test_state_dict_keys_and_shapes_match_official_names():
    sd = tiny_lm().state_dict()
    want = expected_keys()
    assert list(sd) == list(want)  # names and order (the official module's registration order)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want


def test_lm_head_tied_to_text_embedding_and_strict_load_roundtrip():
    lm = tiny_lm()
    body = lm.llm.model
    assert body.lm_head.weight is body.model.embed_tokens.weight
    other = tiny_lm(seed=1)
    other.load_state_dict(lm.state_dict(), strict=True)
    for k, v in lm.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


# ---- (2) Qwen2 body against transformers ----------------------------------------------------

def _hf_reference(ours: Qwen2ForCausalLM):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Qwen2Config(
        hidden_size=TINY["hidden_size"], intermediate_size=TINY["intermediate_size"],
        num_hidden_layers=TINY["num_hidden_layers"], num_attention_heads=TINY["num_attention_heads"],
        num_key_value_heads=TINY["num_key_value_heads"], vocab_size=TINY["vocab_size"],
        rms_norm_eps=TINY["rms_norm_eps"], max_position_embeddings=32768, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": TINY["rope_theta"]},
        use_sliding_window=False, attn_implementation="eager")
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)  # copied by our key names
    return hf


def test_qwen2_body_matches_transformers_fp32_and_bf16():
    torch.manual_seed(0)
    ours = Qwen2ForCausalLM(Qwen2Config(**TINY))
    _randomize(ours)
    ours.eval()
    hf = _hf_reference(ours)
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        ref = hf(inputs_embeds=x).logits
        got = ours(x)
        assert got.shape == ref.shape == (2, 40, TINY["vocab_size"])
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, err

        # bf16: both run in bf16; each must stay near the fp32 reference, ours no worse than
        # a small margin over transformers' own bf16 error.
        ours_bf, hf_bf = ours.to(torch.bfloat16), hf.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        got_bf, ref_bf = ours_bf(xb).float(), hf_bf(inputs_embeds=xb).logits.float()
        assert torch.isfinite(got_bf).all()
        scale = ref.abs().max()
        ours_err = ((got_bf - ref).abs().max() / scale).item()
        hf_err = ((ref_bf - ref).abs().max() / scale).item()
        assert ours_err < 0.05 and ours_err < 2 * hf_err + 1e-2, (ours_err, hf_err)
        assert ((got_bf - ref_bf).abs().max() / scale).item() < 0.05


# ---- (1) KV cache ---------------------------------------------------------------------------

def test_kv_cache_decode_equals_full_recompute():
    torch.manual_seed(0)
    lm = tiny_lm()
    B, T, steps = 2, 9, 6
    seq = torch.randn(B, T + steps + 4, 64)
    with torch.no_grad():
        full = lm(seq)  # (B, L, S + 3), no cache
        cache = lm.new_cache(initial_capacity=4)  # small, so the buffers must grow
        pieces = [lm(seq[:, :T], cache)]
        for i in range(T, T + steps):  # one-token decode steps
            pieces.append(lm(seq[:, i:i + 1], cache))
        pieces.append(lm(seq[:, T + steps:], cache))  # a multi-token chunk after a history
        assert cache.seq_len == seq.shape[1]
        incremental = torch.cat(pieces, dim=1)
        last = lm(seq[:, :T], lm.new_cache(), last_only=True)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, full[:, T - 1], rtol=1e-5, atol=1e-5)
    # The cache really holds the history: a fresh single-token decode must differ.
    with torch.no_grad():
        alone = lm(seq[:, T:T + 1])
    assert (alone[:, 0] - full[:, T]).abs().max() > 1e-3


# ---- (4) sampling ---------------------------------------------------------------------------

def test_sampling_is_reproducible_with_a_generator():
    scores = torch.randn(S + 3).mul(3).log_softmax(0)
    decoded = [1, 2, 3]

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sampling.ras_sampling(scores, decoded, generator=g) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    rand = lambda seed: [sampling.random_sampling(scores, generator=g)
                         for g in [torch.Generator().manual_seed(seed)] for _ in range(10)]
    assert rand(3) == rand(3) and rand(3) != rand(4)
    assert sampling.greedy_sampling(scores) == int(scores.argmax())


def test_nucleus_keeps_top_p_prefix_and_top_k():
    # probs 0.5, 0.25, 0.15, 0.1: mass before = 0, .5, .75, .9 -> top_p 0.8 keeps 3 tokens.
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    scores = probs.log()
    seen = {sampling.nucleus_sampling(scores, top_p=0.8, top_k=25, generator=torch.Generator().manual_seed(s))
            for s in range(300)}
    assert seen == {1, 3, 2}
    seen_k = {sampling.nucleus_sampling(scores, top_p=0.8, top_k=2, generator=torch.Generator().manual_seed(s))
              for s in range(300)}
    assert seen_k == {1, 3}
    # The most likely token is kept even when it alone exceeds top_p.
    peaked = torch.tensor([0.95, 0.03, 0.02]).log()
    assert {sampling.nucleus_sampling(peaked, 0.8, 25, torch.Generator().manual_seed(s)) for s in range(50)} == {0}


def test_ras_resamples_from_full_distribution_when_token_repeats_in_window():
    # Token 5 holds ~all of the nucleus mass; the rest spread over 100 tokens.
    scores = torch.full((100,), -2.0)
    scores[5] = 8.0
    scores = scores.log_softmax(0)
    original = scores.clone()
    no_repeat = [5] + [1] * 10  # 5 occurred 11 tokens ago: outside the window of 10
    with_repeat = [1] * 9 + [5]
    gen = torch.Generator().manual_seed(0)
    assert all(sampling.ras_sampling(scores, no_repeat, generator=gen) == 5 for _ in range(50))
    drawn = [sampling.ras_sampling(scores, with_repeat, generator=gen) for _ in range(200)]
    assert 5 not in drawn  # the repeated token is excluded from the redraw (official -inf)
    assert len(set(drawn)) > 20  # drawn from the full distribution, not from the nucleus
    assert torch.equal(scores, original)  # input not modified (the official edits it in place)
    # win_size * tau_r = 2 -> one occurrence is not enough, two are.
    assert sampling.ras_sampling(scores, with_repeat, tau_r=0.2, generator=gen) == 5
    assert sampling.ras_sampling(scores, [5, 5], tau_r=0.2, generator=gen) != 5


# ---- (5) generation -------------------------------------------------------------------------

def naive_greedy(lm: Qwen2LM, text, prompt_text, prompt_speech, n: int, min_len: int):
    """Full recompute each step, official stop rule, argmax."""
    with torch.no_grad():
        x = lm.build_lm_input(text, prompt_text, prompt_speech)
        out = []
        for i in range(n):
            logp = lm(x)[0, -1].log_softmax(-1)
            if i < min_len:
                logp[S] = -float("inf")
            tok = int(logp.argmax())
            if tok >= S:
                break
            out.append(tok)
            x = torch.cat([x, lm.speech_embedding.weight[tok].view(1, 1, -1)], dim=1)
    return out


def test_build_lm_input_layout():
    lm = tiny_lm()
    text, ptext, pspeech = [5, 6, 7], [1, 2], [10, 11, 12, 13]
    with torch.no_grad():
        x = lm.build_lm_input(torch.tensor([text]), ptext, torch.tensor(pspeech))
        emb = lm.llm.model.model.embed_tokens.weight
        want = torch.cat([lm.llm_embedding.weight[0:1], emb[ptext + text], lm.llm_embedding.weight[1:2],
                          lm.speech_embedding.weight[pspeech]])
    assert x.shape == (1, 1 + 5 + 1 + 4, 64)
    assert torch.equal(x[0], want)
    assert lm.build_lm_input(text).shape == (1, 5, 64)  # no prompt


def test_greedy_inference_matches_naive_recompute():
    lm = tiny_lm()
    text, ptext, pspeech = [3, 4, 5, 6], [7, 8], list(range(100, 120))
    got = list(lm.inference(text, ptext, pspeech, greedy=True, max_new_tokens=15))
    want = naive_greedy(lm, text, ptext, pspeech, 15, min_len=8)
    assert got == want and len(got) > 0


def _with_bias_on(lm: Qwen2LM, token: int) -> Qwen2LM:
    with torch.no_grad():
        lm.llm_decoder.bias[token] += 1e4  # this token dominates every step
    return lm


def test_min_len_suppresses_eos_then_stops():
    lm = _with_bias_on(tiny_lm(), S)  # eos always wins unless masked
    with torch.no_grad():
        lm.llm_decoder.bias[S + 1:] -= 1e4  # keep the other stop tokens out of the sampled run
    out = list(lm.inference([3, 4, 5], greedy=True, min_token_text_ratio=2, max_token_text_ratio=20))
    assert len(out) == 6 and all(t < S for t in out)  # min_len = int(3 * 2)
    sampled = list(lm.inference([3, 4, 5], seed=0, min_token_text_ratio=2))
    assert len(sampled) == 6


def test_other_stop_tokens_stop_even_within_min_len():
    # As the official: ignore_eos masks only eos; S + 1 / S + 2 still end the sequence.
    lm = _with_bias_on(tiny_lm(), S + 2)
    assert list(lm.inference([3, 4, 5], greedy=True)) == []


def test_max_len_and_max_new_tokens_bound_the_output():
    lm = tiny_lm()
    with torch.no_grad():
        lm.llm_decoder.bias[S:] -= 1e4  # never stops by itself
    assert len(list(lm.inference([3, 4], seed=1, max_token_text_ratio=5))) == 10
    assert len(list(lm.inference([3, 4], seed=1, max_new_tokens=7))) == 7


def test_fixed_new_tokens_ignores_every_stop():
    lm = _with_bias_on(tiny_lm(), S)
    out = list(lm.inference([3], seed=2, fixed_new_tokens=25))
    assert len(out) == 25 and all(0 <= t < S for t in out)
    lm = _with_bias_on(tiny_lm(), S + 1)
    assert len(list(lm.inference([3], greedy=True, fixed_new_tokens=12))) == 12


def test_seeded_inference_is_reproducible_and_leaves_global_rng_alone():
    lm = tiny_lm()
    args = ([3, 4, 5, 6], [7], [100, 101, 102])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = list(lm.inference(*args, seed=11, fixed_new_tokens=30))
    after = torch.rand(1)
    b = list(lm.inference(*args, seed=11, fixed_new_tokens=30))
    c = list(lm.inference(*args, seed=12, fixed_new_tokens=30))
    assert a == b and a != c
    assert torch.equal(before, after)  # the per-call generator did not consume the global RNG


def test_bf16_inference_runs():
    lm = tiny_lm().to(torch.bfloat16)
    out = list(lm.inference([3, 4, 5], [6], [100, 101], seed=0, fixed_new_tokens=8))
    assert len(out) == 8 and all(0 <= t < S for t in out)
    with torch.no_grad():
        logits = lm(lm.build_lm_input([3, 4, 5]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
