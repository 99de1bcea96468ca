"""Full size = the official sizes: parameter and key counts of each network of each family (built on
the meta device, so nothing is allocated). Keys and shapes were checked against the official modules;
the counts pin them here."""
import json

import pytest
import torch

from light_tts.models.config import Qwen2Config
from light_tts.models.pretrained import model_class
from light_tts.tools.make_random_model import official_yaml_text

QWEN2_0_5B = 494_032_768  # the published Qwen2-0.5B count, tied embeddings counted once
S = 6561

# (parameters with tied embeddings counted once, state-dict keys) per network. CosyVoice2's LM: Qwen2
# body + speech_embedding + llm_decoder (weight and bias) over S + 3 ids + llm_embedding (sos, task id).
# CosyVoice3: the official modules (cosyvoice.llm.llm.CosyVoice3LM over a Qwen2-0.5B Qwen2ForCausalLM,
# cosyvoice.flow.flow.CausalMaskedDiffWithDiT, cosyvoice.hifigan.generator.CausalHiFTGenerator) built
# at the sizes of the official cosyvoice3.yaml. llm.pt carries lm_head.weight beside the tied
# embed_tokens.weight, as the official state dict does.
OFFICIAL = {
    "cosyvoice2": ({"llm": QWEN2_0_5B + (S + 3) * 896 + (896 * (S + 3) + S + 3) + 2 * 896,
                    "flow": 112_549_360, "hift": 20_821_295},
                   {"llm": 295, "flow": 1121, "hift": 328}),
    "cosyvoice3": ({"llm": 506_148_480, "flow": 332_257_088, "hift": 20_779_887},
                   {"llm": 293, "flow": 330, "hift": 328}),
}


@pytest.mark.parametrize("family", sorted(OFFICIAL))
def test_full_sizes_match_the_official_counts(family, tmp_path):
    model_cls = model_class(family)
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    (tmp_path / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(Qwen2Config().to_json_dict()))
    (tmp_path / model_cls.FAMILY.yaml).write_text(official_yaml_text(family))
    cfg = model_cls.load_config(str(tmp_path))
    counts, keys = {}, {}
    with torch.device("meta"):
        for name in ("llm", "flow", "hift"):
            module = model_cls.build(name, cfg)
            counts[name] = sum(p.numel() for p in module.parameters())
            keys[name] = len(module.state_dict())
    assert (counts, keys) == OFFICIAL[family]


def test_cosyvoice3_lm_count_is_the_qwen2_body_and_two_tables():
    # speech_embedding and the bias-free llm_decoder, both S + 200 rows; no llm_embedding
    assert OFFICIAL["cosyvoice3"][0]["llm"] == QWEN2_0_5B + 2 * (S + 200) * 896
