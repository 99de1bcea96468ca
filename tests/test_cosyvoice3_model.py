"""CosyVoice3: the LM's special ids and stop rules, the config parser and the v3 speech tokenizer's
interface (the directory, family detection and strict loading: tests/test_loader.py, for every family)."""
import json
import os

import numpy as np
import pytest
import torch

from light_tts.models.bistream import SOS, TEXT
from light_tts.models.config import ConfigError, Qwen2Config, load_cosyvoice3_config
from light_tts.models.cosyvoice3 import CosyVoice3Model
from light_tts.models.llm import CosyVoice3LM
from light_tts.tools.make_random_model import official_yaml_text, tiny_yaml_text

S = 6561
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cv3_llm(tiny_cv3_model_dir):
    return CosyVoice3Model.from_pretrained(tiny_cv3_model_dir, components=("llm",)).llm


# ---- the LM -----------------------------------------------------------------------------------------

def test_special_ids_and_stop_set(cv3_llm):
    lm = cv3_llm
    assert (lm.sos, lm.eos_token, lm.task_id, lm.fill_token) == (S, S + 1, S + 2, S + 3)
    assert lm.stop_token_ids == range(S, S + 200)
    assert not hasattr(lm, "llm_embedding") and lm.llm_decoder.bias is None
    assert lm.special_embedding is lm.speech_embedding
    keys = lm.state_dict()
    assert keys["speech_embedding.weight"].shape == (S + 200, 64)
    assert keys["llm_decoder.weight"].shape == (S + 200, 64)
    assert {k for k in keys if not k.startswith("llm.model.")} == {"llm_decoder.weight", "speech_embedding.weight"}


def test_lm_input_takes_sos_and_task_from_the_speech_table(cv3_llm):
    lm, eop = cv3_llm, cv3_llm.endofprompt_id
    text, ptext, pspeech = [5, 6, 7], [eop, 8], [10, 11, 12]
    with torch.no_grad():
        x = lm.build_lm_input(text, ptext, pspeech)[0]
        sp, emb = lm.speech_embedding.weight, lm.llm.model.model.embed_tokens.weight
        want = torch.cat([sp[S:S + 1], emb[ptext + text], sp[S + 2:S + 3], sp[pspeech]])
    assert torch.equal(x, want)


def test_endofprompt_is_the_first_id_after_the_tokenizer_files(tiny_cv3_model_dir, cv3_llm):
    with open(os.path.join(tiny_cv3_model_dir, "CosyVoice-BlankEN", "vocab.json")) as f:
        num_bpe = len(json.load(f))
    assert cv3_llm.endofprompt_id == num_bpe + 3  # after <|endoftext|>, <|im_start|>, <|im_end|>
    # the official ids with the Qwen2 files: 151643 BPE tokens -> <|endofprompt|> = 151646
    small = Qwen2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=32)
    assert CosyVoice3LM(64, 64, S, small).endofprompt_id == 151646


def test_text_without_endofprompt_is_refused(cv3_llm):
    with pytest.raises(ValueError, match="endofprompt"):
        list(cv3_llm.inference([5, 6, 7], [8, 9], [1, 2]))
    with pytest.raises(ValueError, match="endofprompt"):
        list(cv3_llm.inference_bistream([[5, 6, 7]], [8, 9], [1, 2]))
    assert len(list(cv3_llm.inference([5, 6, cv3_llm.endofprompt_id], max_new_tokens=3, fixed_new_tokens=3))) == 3


class _Head(torch.nn.Module):
    """A speech head under which each id of `prefer` outranks the next, whatever the hidden state."""

    def __init__(self, prefer):
        super().__init__()
        self.prefer = prefer

    def forward(self, h):
        out = torch.zeros(*h.shape[:-1], S + 200)
        for rank, tok in enumerate(self.prefer):
            out[..., tok] = 100.0 - 10 * rank
        return out


def test_ignore_eos_masks_id_s_only_as_the_official(cv3_llm):
    lm, text = cv3_llm, [5, 6, 7, cv3_llm.endofprompt_id]  # 4 text ids: min_len 8 at the default ratio 2

    def run(prefer, **kw):
        original, lm.llm_decoder = lm.llm_decoder, _Head(prefer)
        try:
            return list(lm.inference(text, greedy=True, **kw))
        finally:
            lm.llm_decoder = original

    assert run([S, 7], max_new_tokens=20) == [7] * 8  # id S (sos here) is masked for min_len, then stops
    assert run([S + 1, 7], max_new_tokens=20) == []  # eos is not: the official sampling_ids masks id S only
    assert run([S + 150, 7], max_new_tokens=20) == []  # every one of the 200 extra ids stops
    assert run([S + 1, 7], fixed_new_tokens=5) == [7] * 5


def test_bistream_policy_of_cosyvoice3(cv3_llm):
    lm, eop = cv3_llm, cv3_llm.endofprompt_id
    policy = lm.bistream_policy([40, 41, eop, 42, 43], [1, 2, 3])
    assert policy.fill == S + 3
    assert policy.lm_input == [(SOS, 0), (TEXT, 40), (TEXT, 41), (TEXT, eop)]  # the instruction follows sos
    assert policy.text == [42, 43]  # only the transcript after <|endofprompt|> is queued
    with pytest.raises(ValueError, match="endofprompt"):
        lm.bistream_policy([40, 41], [])
    tokens = list(lm.inference_bistream([[5, 6, 7], [8, 9, 10, 11]], [eop, 42, 43], list(range(20)), seed=0,
                                        max_final_tokens=10))
    assert all(0 <= t < S for t in tokens)


# ---- config and generator -----------------------------------------------------------------------------

def _dir_with(tmp_path, text):
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    (tmp_path / "CosyVoice-BlankEN" / "config.json").write_text("{}")
    (tmp_path / "cosyvoice3.yaml").write_text(text)
    return str(tmp_path)


def test_official_cosyvoice3_yaml_sizes(tmp_path):
    marker = tmp_path / "pwned"
    text = f'__evil: !apply:os.system ["touch {marker}"]\n' + official_yaml_text("cosyvoice3")
    cfg = load_cosyvoice3_config(_dir_with(tmp_path, text))
    assert not marker.exists()  # no tag is executed
    assert (cfg.sample_rate, cfg.token_frame_rate, cfg.token_mel_ratio, cfg.chunk_size) == (24000, 25, 2, 25)
    assert cfg.llm == {"llm_input_size": 896, "llm_output_size": 896, "speech_token_size": 6561,
                       "length_normalized_loss": True, "lsm_weight": 0, "mix_ratio": [5, 15]}
    assert cfg.sampling == {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}
    assert cfg.flow["input_size"] == 80 and cfg.flow["vocab_size"] == 6561 and cfg.flow["pre_lookahead_len"] == 3
    assert "pre_lookahead_layer" not in cfg.flow and "decoder" not in cfg.flow
    assert cfg.pre_lookahead == {"in_channels": 80, "channels": 1024, "pre_lookahead_len": 3}
    assert cfg.cfm["in_channels"] == 240 and float(cfg.cfm["inference_cfg_rate"]) == 0.7
    assert cfg.cfm["t_scheduler"] == "cosine" and "estimator" not in cfg.cfm and "cfm_params" not in cfg.cfm
    assert cfg.estimator == {"dim": 1024, "depth": 22, "heads": 16, "dim_head": 64, "ff_mult": 2, "mel_dim": 80,
                             "mu_dim": 80, "spk_dim": 80, "out_channels": 80, "static_chunk_size": 50,
                             "num_decoding_left_chunks": -1}
    assert cfg.hift["conv_pre_look_right"] == 4 and cfg.hift["upsample_rates"] == [8, 5, 3]
    assert "f0_predictor" not in cfg.hift and cfg.f0_predictor == {"num_class": 1, "in_channels": 80,
                                                                    "cond_channels": 512}
    assert cfg.feat_extractor["fmax"] is None and cfg.feat_extractor["hop_size"] == 480  # CosyVoice2: fmax 8000
    assert cfg.endofprompt_id == 151646  # no tokenizer files: the official constant


def test_a_cosyvoice2_yaml_is_refused_by_the_cosyvoice3_parser(tmp_path):
    with pytest.raises(ConfigError, match="expected CosyVoice3LM, found cosyvoice.llm.llm.Qwen2LM"):
        load_cosyvoice3_config(_dir_with(tmp_path, official_yaml_text("cosyvoice2")))


def test_tiny_cosyvoice3_yaml_keeps_the_structure(tmp_path):
    cfg = load_cosyvoice3_config(_dir_with(tmp_path, tiny_yaml_text("cosyvoice3")))
    assert cfg.llm["llm_input_size"] == 64 and cfg.estimator["dim"] == 64 and cfg.estimator["depth"] == 2
    assert cfg.pre_lookahead["channels"] == 64 and cfg.hift["base_channels"] == 32
    assert cfg.flow["input_size"] == 80 and cfg.estimator["mel_dim"] == 80 and cfg.llm["speech_token_size"] == S


def test_speech_tokenizer_v3_interface(tiny_cv3_model_dir, tiny_model_dir):
    import onnxruntime
    sess = onnxruntime.InferenceSession(os.path.join(tiny_cv3_model_dir, "speech_tokenizer_v3.onnx"),
                                        providers=["CPUExecutionProvider"])
    feats_in, len_in = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert (feats_in.name, feats_in.type, feats_in.shape[1]) == ("feats", "tensor(float)", 128)
    assert (len_in.name, len_in.type) == ("feats_length", "tensor(int32)")
    assert (out.name, out.type) == ("indices", "tensor(int32)")
    mel = (np.random.default_rng(0).standard_normal((1, 128, 401)) * 0.5).astype(np.float32)
    # the official frontend's call: inputs by position, the length as int32, the first output
    tokens = sess.run(None, {feats_in.name: mel, len_in.name: np.array([mel.shape[2]], dtype=np.int32)})[0]
    assert tokens.shape == (1, 101) and tokens.dtype == np.int32 and 0 <= tokens.min() and tokens.max() < S
    v2 = onnxruntime.InferenceSession(os.path.join(tiny_model_dir, "speech_tokenizer_v2.onnx"),
                                      providers=["CPUExecutionProvider"])
    assert not np.array_equal(tokens, v2.run(None, {"feats": mel, "feats_length": np.array([401], np.int32)})[0])
