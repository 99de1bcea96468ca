"""CosyVoice2Model: the three networks of an official CosyVoice2 directory, loaded unchanged.

    model = CosyVoice2Model.from_pretrained("pretrained_models/CosyVoice2-0.5B", device="cuda",
                                            dtype=torch.bfloat16)
    model.llm    # Qwen2LM: text + prompt speech tokens -> speech tokens
    model.flow   # CausalMaskedDiffWithXvec: speech tokens -> 80-bin mel at 50 Hz
    model.hift   # HiFTGenerator: mel -> 24 kHz waveform

Each server process loads only what it runs (`components=("llm",)` in the LLM process,
`("flow", "hift")` in a decode process). The loading itself (strict, with errors naming the file
and key) is light_tts.models.pretrained.PretrainedModel.from_pretrained, shared with CosyVoice3;
`light_tts.models.pretrained.load_model` picks the family from the directory.
"""
from __future__ import annotations

from light_tts.models.config import CosyVoice2Config
from light_tts.models.pretrained import COMPONENTS, COSYVOICE2, DTYPES, PretrainedModel, parse_dtype

__all__ = ["CosyVoice2Model", "COMPONENTS", "DTYPES", "parse_dtype"]


class CosyVoice2Model(PretrainedModel):
    FAMILY = COSYVOICE2
    NETWORKS = {"llm": "light_tts.models.llm:Qwen2LM", "flow": "light_tts.models.flow.flow:CausalMaskedDiffWithXvec",
                "hift": "light_tts.models.hift:HiFTGenerator"}
    config: CosyVoice2Config
