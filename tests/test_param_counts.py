"""Full size = the official sizes: parameter and key counts of each network (built on the meta
device, so nothing is allocated). Keys and shapes were checked against the official modules; the
counts pin them here."""
import json

import torch

from light_tts.models.config import Qwen2Config, load_cosyvoice2_config
from light_tts.models.cosyvoice2 import BUILDERS
from light_tts.tools.make_random_model import official_yaml_text

QWEN2_0_5B = 494_032_768  # the published Qwen2-0.5B count, tied embeddings counted once
SPEECH_VOCAB = 6561 + 3


def test_full_sizes_match_the_official_counts(tmp_path):
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    (tmp_path / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(Qwen2Config().to_json_dict()))
    (tmp_path / "cosyvoice2.yaml").write_text(official_yaml_text())
    cfg = load_cosyvoice2_config(str(tmp_path))
    counts, keys = {}, {}
    with torch.device("meta"):
        for name, build in BUILDERS.items():
            module = build(cfg)
            counts[name] = sum(p.numel() for p in module.parameters())
            keys[name] = len(module.state_dict())
    # Qwen2 body + speech_embedding + llm_decoder (weight and bias) + llm_embedding (sos, task id)
    assert counts["llm"] == QWEN2_0_5B + SPEECH_VOCAB * 896 + (896 * SPEECH_VOCAB + SPEECH_VOCAB) + 2 * 896
    assert counts["flow"] == 112_549_360
    assert counts["hift"] == 20_821_295
    # llm.pt carries lm_head.weight beside the tied embed_tokens.weight, as the official state dict does
    assert keys == {"llm": 295, "flow": 1121, "hift": 328}


# The official modules (cosyvoice.llm.llm.CosyVoice3LM over a Qwen2-0.5B Qwen2ForCausalLM,
# cosyvoice.flow.flow.CausalMaskedDiffWithDiT, cosyvoice.hifigan.generator.CausalHiFTGenerator)
# built at the sizes of the official cosyvoice3.yaml: parameters (tied embeddings once) and state-dict keys.
OFFICIAL_COSYVOICE3 = {"llm": 506_148_480, "flow": 332_257_088, "hift": 20_779_887}
OFFICIAL_COSYVOICE3_KEYS = {"llm": 293, "flow": 330, "hift": 328}


def test_cosyvoice3_full_sizes_match_the_official_counts(tmp_path):
    from light_tts.models.config import load_cosyvoice3_config
    from light_tts.models.cosyvoice3 import BUILDERS as CV3_BUILDERS
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    (tmp_path / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(Qwen2Config().to_json_dict()))
    (tmp_path / "cosyvoice3.yaml").write_text(official_yaml_text("cosyvoice3"))
    cfg = load_cosyvoice3_config(str(tmp_path))
    counts, keys = {}, {}
    with torch.device("meta"):
        for name, build in CV3_BUILDERS.items():
            module = build(cfg)
            counts[name] = sum(p.numel() for p in module.parameters())
            keys[name] = len(module.state_dict())
    # Qwen2 body + speech_embedding + llm_decoder (no bias), both S + 200 rows; no llm_embedding
    assert counts["llm"] == QWEN2_0_5B + 2 * (6561 + 200) * 896 == OFFICIAL_COSYVOICE3["llm"]
    assert counts == OFFICIAL_COSYVOICE3
    assert keys == OFFICIAL_COSYVOICE3_KEYS
