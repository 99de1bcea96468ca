"""CosyVoice2Model: the three networks of an official CosyVoice2 directory, loaded unchanged.

    model = CosyVoice2Model.from_pretrained("pretrained_models/CosyVoice2-0.5B", device="cuda",
                                            dtype=torch.bfloat16)
    model.llm    # Qwen2LM: text + prompt speech tokens -> speech tokens
    model.flow   # CausalMaskedDiffWithXvec: speech tokens -> 80-bin mel at 50 Hz
    model.hift   # HiFTGenerator: mel -> 24 kHz waveform

Each server process loads only what it runs (`components=("llm",)` in the LLM process,
`("flow", "hift")` in a decode process).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from light_tts.models.config import ConfigError, CosyVoice2Config, load_cosyvoice2_config
from light_tts.models.loading import ModelLoadError, load_strict, read_state_dict, require_file, skip_weight_init

COMPONENTS = ("llm", "flow", "hift")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


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


def normalize_state_dict(component: str, sd: dict) -> dict:
    """Official files may carry spellings of the same keys that torch accepts too."""
    if component == "hift":
        from light_tts.models.hift import normalize_hift_state_dict
        return normalize_hift_state_dict(sd)
    return sd


@dataclass
class CosyVoice2Model:
    config: CosyVoice2Config
    model_dir: str
    device: torch.device
    dtype: torch.dtype
    llm: Optional[nn.Module] = None
    flow: Optional[nn.Module] = None
    hift: Optional[nn.Module] = None
    load_seconds: dict = field(default_factory=dict)

    @classmethod
    def from_pretrained(cls, model_dir: str, device: "str | torch.device" = "cpu",
                        dtype: "str | torch.dtype" = torch.float32,
                        components: Iterable[str] = COMPONENTS) -> "CosyVoice2Model":
        components = tuple(components)
        for c in components:
            if c not in COMPONENTS:
                raise ValueError(f"unknown component {c!r}; choose from {COMPONENTS}")
        require_file(model_dir, "cosyvoice2.yaml")
        require_file(model_dir, "CosyVoice-BlankEN/config.json")
        try:
            cfg = load_cosyvoice2_config(model_dir)
        except ConfigError as e:
            raise ModelLoadError(str(e)) from e
        model = cls(config=cfg, model_dir=model_dir, device=torch.device(device), dtype=parse_dtype(dtype))
        for c in components:
            t0 = time.perf_counter()
            path = require_file(model_dir, f"{c}.pt")
            with skip_weight_init():
                module = BUILDERS[c](cfg)
            load_strict(module, normalize_state_dict(c, read_state_dict(path)), path)
            module.to(device=model.device, dtype=model.dtype).eval()
            setattr(model, c, module)
            model.load_seconds[c] = time.perf_counter() - t0
        return model
