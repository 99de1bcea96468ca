import os

import pytest

from light_tts.models.config import ConfigError, load_cosyvoice2_config, load_hyper_yaml
from light_tts.tools.make_random_model import official_yaml_text, tiny_yaml_text

REFERENCE_YAML = os.path.join(os.path.dirname(__file__), "..", "light_tts", "tools", "assets", "cosyvoice2.yaml")


def _dir_with(tmp_path, yaml_text, qwen_json="{}"):
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    (tmp_path / "CosyVoice-BlankEN" / "config.json").write_text(qwen_json)
    (tmp_path / "cosyvoice2.yaml").write_text(yaml_text)
    return str(tmp_path)


def test_official_yaml_sizes(tmp_path):
    cfg = load_cosyvoice2_config(_dir_with(tmp_path, official_yaml_text()))
    assert cfg.sample_rate == 24000 and cfg.token_mel_ratio == 2 and cfg.chunk_size == 25
    assert cfg.llm["llm_input_size"] == 896 and cfg.llm["speech_token_size"] == 6561
    assert cfg.sampling == {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}
    assert cfg.encoder["output_size"] == 512 and cfg.encoder["num_blocks"] == 6
    assert cfg.estimator["static_chunk_size"] == 50  # !ref <chunk_size> * <token_mel_ratio>
    assert cfg.estimator["channels"] == [256] and cfg.estimator["num_mid_blocks"] == 12
    assert float(cfg.cfm["inference_cfg_rate"]) == 0.7 and cfg.cfm["t_scheduler"] == "cosine"
    assert cfg.hift["upsample_rates"] == [8, 5, 3] and cfg.hift["istft_params"] == {"n_fft": 16, "hop_len": 4}
    assert cfg.f0_predictor["cond_channels"] == 512
    assert cfg.feat_extractor["fmax"] == 8000 and cfg.feat_extractor["hop_size"] == 480
    assert cfg.qwen2.hidden_size == 896 and cfg.qwen2.num_key_value_heads == 2


def test_tiny_yaml_is_the_official_structure_with_small_widths(tmp_path):
    cfg = load_cosyvoice2_config(_dir_with(tmp_path, tiny_yaml_text()))
    assert cfg.llm["llm_input_size"] == 64
    assert cfg.encoder["output_size"] == 64 and cfg.flow["input_size"] == 64
    assert cfg.estimator["channels"] == [64] and cfg.hift["base_channels"] == 32
    # what tiny must not change
    assert cfg.flow["vocab_size"] == 6561 and cfg.estimator["in_channels"] == 320
    assert cfg.hift["upsample_rates"] == [8, 5, 3]


def test_yaml_constructors_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f'__evil: !apply:os.system ["touch {marker}"]\n' + official_yaml_text()
    load_cosyvoice2_config(_dir_with(tmp_path, text))
    assert not marker.exists()


def test_ref_arithmetic_and_bad_refs(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("a: 3\nb: !ref <a> * 4 + 1\nc: !ref <nope>\n")
    hy = load_hyper_yaml(str(p))
    assert hy.get("b") == 13
    with pytest.raises(ConfigError, match="nope"):
        hy.get("c")


def test_missing_sections_are_named(tmp_path):
    with pytest.raises(ConfigError, match="flow"):
        load_cosyvoice2_config(_dir_with(tmp_path, "sample_rate: 24000\nllm: !new:cosyvoice.llm.llm.Qwen2LM\n  llm_input_size: 8\n"))
