"""The LLM engine against transformers' Qwen2 (CPU, fp32, tiny model, greedy): every piece of a
staggered batch of mixed-length requests gets exactly the speech tokens of a plain decoding loop
over transformers.Qwen2Model with its own KV cache.

In the reference loop only the input layout (Qwen2LM.build_lm_input), the speech head
(llm_decoder) and the speech embedding of the fed-back token are ours; the body, its cache,
positions, rotary embedding and causal attention are transformers'. The length rules are
written out here (Qwen2LM.inference's), not taken from the engine."""
import copy
import inspect

import pytest
import torch

from light_tts.models.cosyvoice2 import CosyVoice2Model
from test_llm_engine import engine, run
from test_llm_process import make_req, text

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")   # one intra-op thread for the tiny model

MIN_TOKEN_TEXT_RATIO, MAX_TOKEN_TEXT_RATIO = 2, 20
# Added to the eos logit of a copy of the tiny model. Its random weights leave eos about 0.4-1.0
# below the best speech token, so eos never wins; with this bias it wins at some steps and not at
# others, and where a piece stops depends on the length rules (checked on the reference below).
EOS_BIAS = 0.55
# transformers 5.x renamed the cache argument (past_key_values -> cache).
CACHE_ARG = "cache" if "cache" in inspect.signature(transformers.Qwen2Model.forward).parameters else "past_key_values"


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return CosyVoice2Model.from_pretrained(tiny_model_dir, components=("llm",)).llm


def hf_body(lm) -> "transformers.Qwen2Model":
    """transformers' Qwen2 built from our config, holding our body weights (strict load)."""
    cfg = lm.llm.model.model.config
    hf_cfg = transformers.Qwen2Config(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size, hidden_act=cfg.hidden_act,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, use_sliding_window=False,
        attn_implementation="eager")  # plain causal softmax attention, as the official LM
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    hf.load_state_dict(lm.llm.model.state_dict(), strict=True)
    return hf.model


@torch.inference_mode()
def hf_greedy(body, lm, req, piece) -> tuple[list, bool, bool]:
    """One piece decoded token by token through transformers' KV cache. Returns (tokens, whether
    the masking changed an argmax (eos before the min length, any stop token in fixed-length mode),
    whether a stop token ended the piece)."""
    S = lm.speech_token_size
    min_len, max_len = int(len(piece) * MIN_TOKEN_TEXT_RATIO), int(len(piece) * MAX_TOKEN_TEXT_RATIO)
    fixed = req.fixed_speech_tokens is not None
    if fixed:
        min_len = max_len = req.fixed_speech_tokens
    elif req.max_speech_tokens is not None:
        max_len = min(max_len, req.max_speech_tokens)
    x = lm.build_lm_input(piece, req.prompt_text_ids.tolist(), req.prompt_speech_tokens.tolist())
    cache = transformers.DynamicCache()
    tokens, masked = [], False
    for step in range(max_len):
        hidden = body(inputs_embeds=x, use_cache=True, **{CACHE_ARG: cache}).last_hidden_state[0, -1]  # final norm
        scores = lm.llm_decoder(hidden).float().log_softmax(dim=-1)
        if fixed:                                   # fixed length: every stop token masked
            masked |= int(scores.argmax()) >= S
            scores[S:] = -float("inf")
        elif step < min_len:                        # before the min length only eos is masked
            masked |= int(scores.argmax()) == S
            scores[S] = -float("inf")
        token = int(scores.argmax())
        if token >= S:                              # eos, S + 1 or S + 2 ends the piece, not emitted
            return tokens, masked, True
        tokens.append(token)
        x = lm.speech_embedding(torch.tensor([[token]]))
    return tokens, masked, False


def mixed_requests():
    """Different prompt text, prompt speech and text lengths; multi-piece, fixed and capped requests."""
    return [make_req("a", [text(3), text(2, 300)], max_speech_tokens=25),
            make_req("b", [text(7, 200)], prompt_text=tuple(range(20, 31)), prompt_speech=tuple(range(40, 57)),
                     max_speech_tokens=30),
            make_req("c", [text(1, 400)], prompt_text=(), prompt_speech=()),          # ratio bound: 20 tokens
            make_req("d", [text(4, 500), text(0), text(2, 600)], prompt_speech=tuple(range(900, 906)),
                     fixed_speech_tokens=9),
            make_req("e", [text(5, 700)], prompt_speech=tuple(range(3000, 3023)), max_speech_tokens=12),
            make_req("f", [text(2, 800), text(6, 850)], prompt_text=(9,), prompt_speech=(6000,), max_speech_tokens=40),
            make_req("g", [text(3)], fixed_speech_tokens=10)]                    # a's first piece: S + 2 wins at 6


@pytest.mark.parametrize("eos_bias", [0.0, EOS_BIAS], ids=["plain", "eos_biased"])
def test_greedy_engine_equals_transformers_decoding(lm, eos_bias):
    if eos_bias:
        lm = copy.deepcopy(lm)
        with torch.no_grad():
            lm.llm_decoder.bias[lm.speech_token_size] += eos_bias
    reqs = {r.rid: r for r in mixed_requests()}
    arrive = {0: "ab", 3: "cd", 9: "eg", 14: "f"}   # the later ones join while others decode
    got, results, errors = run(engine(lm, greedy=True), {t: [reqs[rid] for rid in rids] for t, rids in arrive.items()})
    assert not errors
    assert max(r.batch_size for r in results if r.kind == "decode") >= 4
    body = hf_body(lm)
    refs = {rid: [hf_greedy(body, lm, r, p) for p in r.text_pieces] for rid, r in reqs.items()}
    for rid in reqs:
        assert got[rid] == [tokens for tokens, _, _ in refs[rid]], rid
    assert [len(p) for p in got["d"]] == [9, 9, 9]
    assert len(got["g"][0]) == 10 and len(got["a"][0]) == 6 and got["g"][0][:6] == got["a"][0]
    # The rules are exercised: S + 2 ends a's first piece before its max length and is masked for g
    # (fixed length); with the eos bias the min length also holds eos back somewhere.
    flags = [(reqs[rid].fixed_speech_tokens is not None, masked, stopped)
             for rid, pieces in refs.items() for _, masked, stopped in pieces]
    assert any(stopped for _, _, stopped in flags) and any(masked for fixed, masked, _ in flags if fixed)
    assert any(masked for fixed, masked, _ in flags if not fixed) == bool(eos_bias)
