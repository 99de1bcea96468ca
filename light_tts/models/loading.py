"""Strict state-dict loading with errors that say which file and which key is wrong."""
from __future__ import annotations

import contextlib
import os
from typing import Mapping

import torch
from torch import nn

from light_tts.models.hub import ModelLoadError  # defined torch-free there (the server launcher raises it too)


# What each file of the official CosyVoice2-0.5B directory is, for "file missing" messages.
OFFICIAL_LAYOUT = {
    "cosyvoice2.yaml": "the model configuration",
    "llm.pt": "the speech-token LM weights (Qwen2LM state dict)",
    "flow.pt": "the flow-matching decoder weights",
    "hift.pt": "the HiFT vocoder weights",
    "campplus.onnx": "the speaker-embedding network",
    "speech_tokenizer_v2.onnx": "the speech tokenizer",
    "CosyVoice-BlankEN/config.json": "the Qwen2 body configuration",
}


def require_file(model_dir: str, name: str) -> str:
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        present = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []
        layout = ", ".join(OFFICIAL_LAYOUT)
        where = f"{model_dir} holds: {', '.join(present) or 'nothing'}" if os.path.isdir(model_dir) \
            else f"{model_dir} is not a directory"
        raise ModelLoadError(
            f"{path} is missing ({OFFICIAL_LAYOUT.get(name, 'required file')}). A CosyVoice2 model directory "
            f"holds {layout} (the official CosyVoice2-0.5B release, or one written by "
            f"`python -m light_tts.tools.make_random_model`); {where}")
    return path


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read as a PyTorch state dict: {e}") from e
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read as a PyTorch state dict: {e}") from e
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(sd)


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], path: str) -> None:
    """Load `sd` into `module`, refusing any missing, unexpected or mis-shaped key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing key '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        problems.append(f"unexpected key '{unexpected[0]}'"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, v in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            problems.append(f"key '{k}' has shape {tuple(sd[k].shape)} in the file, "
                            f"the configuration expects {tuple(v.shape)}")
            break
    if problems:
        raise ModelLoadError(f"{path}: " + "; ".join(problems)
                             + ". Does this file belong to the cosyvoice2.yaml and CosyVoice-BlankEN/config.json beside it?")
    module.load_state_dict(sd, strict=True)


@contextlib.contextmanager
def skip_weight_init():
    """Build modules without drawing their random initial weights: a checkpoint overwrites every
    one of them, and initialising the 0.5 B-parameter LM alone takes seconds on a CPU."""
    names = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_", "orthogonal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)
