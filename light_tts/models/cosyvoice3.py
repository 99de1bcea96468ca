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

from torch import nn

from light_tts.models.config import CosyVoice3Config, load_cosyvoice3_config
from light_tts.models.pretrained import COSYVOICE3, PretrainedModel

__all__ = ["CosyVoice3Model", "BUILDERS"]


def build_llm(cfg: CosyVoice3Config) -> nn.Module:
    from light_tts.models.llm import CosyVoice3LM
    return CosyVoice3LM(**cfg.llm, qwen2=cfg.qwen2, sampling=cfg.sampling, endofprompt_id=cfg.endofprompt_id)


def build_flow_model(cfg: CosyVoice3Config) -> nn.Module:
    from light_tts.models.flow.flow_dit import build_dit_flow
    return build_dit_flow(cfg.flow, cfg.pre_lookahead, cfg.cfm, cfg.estimator)


def build_hift_model(cfg: CosyVoice3Config) -> nn.Module:
    from light_tts.models.hift_causal import build_causal_hift
    return build_causal_hift(cfg.hift, cfg.f0_predictor)


BUILDERS = {"llm": build_llm, "flow": build_flow_model, "hift": build_hift_model}


class CosyVoice3Model(PretrainedModel):
    FAMILY = COSYVOICE3
    BUILDERS = BUILDERS
    config: CosyVoice3Config

    @staticmethod
    def load_config(model_dir: str) -> CosyVoice3Config:
        return load_cosyvoice3_config(model_dir)
