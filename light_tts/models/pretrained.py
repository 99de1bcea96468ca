"""Model directories of every family: which family a directory holds, and one strict loader for all.

    from light_tts.models.pretrained import load_model, model_family
    model_family("pretrained_models/Fun-CosyVoice3-0.5B")     # -> "cosyvoice3"
    model = load_model("pretrained_models/Fun-CosyVoice3-0.5B", device="cuda", dtype="bf16")
    model.llm, model.flow, model.hift                          # CosyVoice3Model's networks

The family is read from the yaml the directory holds, in the order of the official `AutoModel`
(cosyvoice.yaml: CosyVoice 1, not supported; cosyvoice2.yaml; cosyvoice3.yaml). Each family's model
class (CosyVoice2Model, CosyVoice3Model) is a `PretrainedModel` that names its `Family` (files,
config parser) and its network classes; `PretrainedModel.from_pretrained` is the one loading path: every
state dict loads strictly, and a wrong directory fails with the file, the first missing or
unexpected key, or the key whose shape differs.
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Optional, Type

import torch
from torch import nn

from light_tts.models.config import ConfigError, CosyVoice2Config, CosyVoice3Config, ModelConfig
from light_tts.models.hub import resolve_model_dir
from light_tts.models.loading import ModelLoadError, load_strict, read_state_dict, skip_weight_init

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


@dataclass(frozen=True)
class Family:
    """The files of one family's official release and how to read its configuration."""
    name: str                  # "cosyvoice2": the make_random_model --family value
    title: str                 # "CosyVoice2"
    release: str               # the official release directory's name
    config: Type[ModelConfig]  # its parser (config.load) and yaml (config.LAYOUT.yaml)
    speech_tokenizer: str      # the ONNX speech tokenizer's file name
    networks: Mapping[str, str]  # component -> what its .pt holds (for "file missing" messages)

    @property
    def yaml(self) -> str:
        """The file that marks the family (official AutoModel)."""
        return self.config.LAYOUT.yaml

    @property
    def layout(self) -> dict[str, str]:
        """Every file of the official directory -> what it is."""
        return {self.yaml: "the model configuration",
                **{f"{c}.pt": what for c, what in self.networks.items()},
                "campplus.onnx": "the speaker-embedding network",
                self.speech_tokenizer: "the speech tokenizer",
                "CosyVoice-BlankEN/config.json": "the Qwen2 body configuration"}


COSYVOICE2 = Family(
    "cosyvoice2", "CosyVoice2", "CosyVoice2-0.5B", CosyVoice2Config, "speech_tokenizer_v2.onnx",
    {"llm": "the speech-token LM weights (Qwen2LM state dict)",
     "flow": "the flow-matching decoder weights",
     "hift": "the HiFT vocoder weights"})

COSYVOICE3 = Family(
    "cosyvoice3", "CosyVoice3", "Fun-CosyVoice3-0.5B-2512", CosyVoice3Config, "speech_tokenizer_v3.onnx",
    {"llm": "the speech-token LM weights (CosyVoice3LM state dict)",
     "flow": "the flow-matching decoder weights (DiT estimator)",
     "hift": "the causal HiFT vocoder weights"})

# In the official AutoModel's order: the first yaml found decides.
FAMILIES = {f.name: f for f in (COSYVOICE2, COSYVOICE3)}
_COSYVOICE1_YAML = "cosyvoice.yaml"


def _contents(model_dir: str) -> str:
    if not os.path.isdir(model_dir):
        return f"{model_dir} is not a directory"
    return f"{model_dir} holds: {', '.join(sorted(os.listdir(model_dir))) or 'nothing'}"


def _describe(family: Family) -> str:
    return (f"a {family.title} model directory holds {', '.join(family.layout)} (the official {family.release} "
            f"release, or one written by `python -m light_tts.tools.make_random_model --family {family.name}`)")


def require_file(model_dir: str, name: str, family: Family) -> str:
    """The path of `name` in `model_dir`, or a ModelLoadError saying what the directory should hold."""
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        what = family.layout.get(name, "required file")
        describe = _describe(family)
        raise ModelLoadError(f"{path} is missing ({what}). {describe[0].upper()}{describe[1:]}; {_contents(model_dir)}")
    return path


def model_family(model_dir: str) -> str:
    """The family name ("cosyvoice2" or "cosyvoice3") from the yaml the directory holds, in the
    official AutoModel's order; a ModelLoadError that says what a directory should hold otherwise."""
    if os.path.isdir(model_dir):
        for family in FAMILIES.values():
            if os.path.isfile(os.path.join(model_dir, family.yaml)):
                return family.name
        if os.path.isfile(os.path.join(model_dir, _COSYVOICE1_YAML)):
            raise ModelLoadError(f"{model_dir} holds {_COSYVOICE1_YAML}: CosyVoice 1 models are not supported; "
                                 f"use a CosyVoice2 or CosyVoice3 directory")
    yamls = " nor ".join(f.yaml for f in FAMILIES.values())
    raise ModelLoadError(f"{model_dir}: no model found (neither {yamls}). "
                         + "; ".join(_describe(f) for f in FAMILIES.values()) + f". {_contents(model_dir)}")


@dataclass
class PretrainedModel:
    """The three networks of one official model directory, loaded unchanged. Subclasses name their
    FAMILY (files and config) and their NETWORKS: component -> our network class as "module:Class",
    imported when built (a process imports only the networks it runs); each class builds itself
    from the family's config with `from_config(cfg)`."""
    FAMILY: ClassVar[Family]
    NETWORKS: ClassVar[Mapping[str, str]]

    config: Any
    model_dir: str
    device: torch.device
    dtype: torch.dtype
    llm: Optional[nn.Module] = None
    flow: Optional[nn.Module] = None
    hift: Optional[nn.Module] = None
    load_seconds: dict = field(default_factory=dict)

    @classmethod
    def load_config(cls, model_dir: str) -> ModelConfig:
        return cls.FAMILY.config.load(model_dir)

    @classmethod
    def build(cls, component: str, cfg: ModelConfig) -> nn.Module:
        """The network `component` at the sizes of `cfg`, freshly initialised."""
        module, _, name = cls.NETWORKS[component].partition(":")
        return getattr(importlib.import_module(module), name).from_config(cfg)

    @staticmethod
    def normalize_state_dict(component: str, sd: dict) -> dict:
        """Official files may carry spellings of the same keys that torch accepts too."""
        if component == "hift":
            from light_tts.models.hift import normalize_hift_state_dict
            return normalize_hift_state_dict(sd)
        return sd

    @classmethod
    def from_pretrained(cls, model_dir: str, device: "str | torch.device" = "cpu",
                        dtype: "str | torch.dtype" = torch.float32,
                        components: Iterable[str] = COMPONENTS) -> "PretrainedModel":
        components = tuple(components)
        for c in components:
            if c not in COMPONENTS:
                raise ValueError(f"unknown component {c!r}; choose from {COMPONENTS}")
        family = cls.FAMILY
        require_file(model_dir, family.yaml, family)
        require_file(model_dir, "CosyVoice-BlankEN/config.json", family)
        try:
            cfg = cls.load_config(model_dir)
        except ConfigError as e:
            raise ModelLoadError(str(e)) from e
        model = cls(config=cfg, model_dir=model_dir, device=torch.device(device), dtype=parse_dtype(dtype))
        for c in components:
            t0 = time.perf_counter()
            path = require_file(model_dir, f"{c}.pt", family)
            with skip_weight_init():
                module = cls.build(c, cfg)
            _load_strict(module, cls.normalize_state_dict(c, read_state_dict(path)), path, family)
            module.to(device=model.device, dtype=model.dtype).eval()
            setattr(model, c, module)
            model.load_seconds[c] = time.perf_counter() - t0
        return model


def _load_strict(module: nn.Module, sd: dict, path: str, family: Family) -> None:
    try:
        load_strict(module, sd, path)
    except ModelLoadError as e:
        # loading.load_strict's closing hint names CosyVoice2's yaml; name this family's.
        raise ModelLoadError(str(e).replace(COSYVOICE2.yaml, family.yaml)) from None


def model_class(family: str) -> type:
    """The PretrainedModel subclass of a family name."""
    if family == COSYVOICE2.name:
        from light_tts.models.cosyvoice2 import CosyVoice2Model
        return CosyVoice2Model
    if family == COSYVOICE3.name:
        from light_tts.models.cosyvoice3 import CosyVoice3Model
        return CosyVoice3Model
    raise ValueError(f"unknown model family {family!r}; choose from {tuple(FAMILIES)}")


def load_model(model_dir: str, device: "str | torch.device" = "cpu", dtype: "str | torch.dtype" = torch.float32,
               components: Iterable[str] = COMPONENTS) -> PretrainedModel:
    """Load whichever family `model_dir` holds (CosyVoice2Model or CosyVoice3Model). `model_dir` may
    be a ModelScope id (iic/CosyVoice2-0.5B), as the official AutoModel's: see light_tts.models.hub;
    the model's `model_dir` is then the local directory."""
    model_dir = resolve_model_dir(model_dir)
    return model_class(model_family(model_dir)).from_pretrained(model_dir, device, dtype, components)
