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

from torch import nn

from light_tts.models.config import CosyVoice2Config, load_cosyvoice2_config
from light_tts.models.pretrained import COMPONENTS, COSYVOICE2, DTYPES, PretrainedModel, parse_dtype

__all__ = ["CosyVoice2Model", "BUILDERS", "COMPONENTS", "DTYPES", "parse_dtype"]


def build_llm(cfg: CosyVoice2Config) -> nn.Module:
    from light_tts.models.llm import Qwen2LM
    return Qwen2LM(**cfg.llm, qwen2=cfg.qwen2, sampling=cfg.sampling)


def build_flow_model(cfg: CosyVoice2Config) -> nn.Module:
    from light_tts.models.flow.flow import build_flow
    return build_flow(cfg.flow, cfg.encoder, cfg.cfm, cfg.estimator)


def build_hift_model(cfg: CosyVoice2Config) -> nn.Module:
    from light_tts.models.hift import build_hift
    return build_hift(cfg.hift, cfg.f0_predictor)


BUILDERS = {"llm": build_llm, "flow": build_flow_model, "hift": build_hift_model}


class CosyVoice2Model(PretrainedModel):
    FAMILY = COSYVOICE2
    BUILDERS = BUILDERS
    config: CosyVoice2Config

    @staticmethod
    def load_config(model_dir: str) -> CosyVoice2Config:
        return load_cosyvoice2_config(model_dir)
