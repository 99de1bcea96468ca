"""CosyVoice3Model: the three networks of an official Fun-CosyVoice3-0.5B directory, loaded unchanged.

    model = CosyVoice3Model.from_pretrained("pretrained_models/Fun-CosyVoice3-0.5B", device="cuda",
                                            dtype=torch.bfloat16)
    model.llm    # CosyVoice3LM: text + prompt speech tokens -> speech tokens (Qwen2 body as CosyVoice2)
    model.flow   # CausalMaskedDiffWithDiT: speech tokens -> 80-bin mel at 50 Hz (DiT estimator)
    model.hift   # CausalHiFTGenerator: mel -> 24 kHz waveform

The directory (official layout): cosyvoice3.yaml, llm.pt, flow.pt, hift.pt, campplus.onnx,
speech_tokenizer_v3.onnx, CosyVoice-BlankEN/ (Qwen2 config.json and tokenizer files). Loading is
light_tts.models.pretrained.PretrainedModel.from_pretrained, shared with CosyVoice2Model;
`light_tts.models.pretrained.load_model` picks the family from the directory.
"""
from __future__ import annotations

from light_tts.models.config import CosyVoice3Config
from light_tts.models.pretrained import COSYVOICE3, PretrainedModel

__all__ = ["CosyVoice3Model"]


class CosyVoice3Model(PretrainedModel):
    FAMILY = COSYVOICE3
    NETWORKS = {"llm": "light_tts.models.llm:CosyVoice3LM",
                "flow": "light_tts.models.flow.flow_dit:CausalMaskedDiffWithDiT",
                "hift": "light_tts.models.hift_causal:CausalHiFTGenerator"}
    config: CosyVoice3Config
