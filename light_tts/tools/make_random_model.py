"""Write a CosyVoice2 or CosyVoice3 model directory with random weights, in the official layout and formats.

    python -m light_tts.tools.make_random_model --size tiny --out models/tiny
    python -m light_tts.tools.make_random_model --size full --out models/full   # ~3.4 GB
    python -m light_tts.tools.make_random_model --family cosyvoice3 --size tiny --out models/cv3-tiny

`full` has the official sizes (the official cosyvoice2.yaml / cosyvoice3.yaml model section, a
Qwen2-0.5B body); `tiny` has the same structure with small widths so a whole synthesis runs in
about a second on a CPU. Random weights make noise, not speech: they exist so that loading, shapes,
cost, streaming and batching can be tested and measured without the real checkpoint.

Files (as the official releases): <family>.yaml, llm.pt, flow.pt, hift.pt, campplus.onnx, the
speech tokenizer (speech_tokenizer_v2.onnx for CosyVoice2, speech_tokenizer_v3.onnx for CosyVoice3)
and CosyVoice-BlankEN/ (Qwen2 config.json, model.safetensors, plain Qwen2 tokenizer files: each
family's official tokenizer adds its special tokens at load time).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn

from light_tts.models.config import Qwen2Config
from light_tts.models.pretrained import COSYVOICE2, COSYVOICE3, FAMILIES, Family, model_class


def _narrow(key: str, official, tiny, lines: int = 1) -> tuple:
    """A tiny edit of the official yaml: `key: official` -> `key: tiny` (at any indentation), on
    exactly `lines` lines: (pattern, replacement, expected count)."""
    return rf"^([ \t]*){key}: {re.escape(str(official))}$", rf"\g<1>{key}: {tiny}", lines


# Tiny differs from the official yaml only in these widths. Both families: the LM (a Qwen2 body of
# width 64, TINY_QWEN2) and the vocoder.
_TINY_LM = [_narrow("llm_input_size", 896, 64), _narrow("llm_output_size", 896, 64)]
_TINY_HIFT = [_narrow("base_channels", 512, 32), _narrow("cond_channels", 512, 32)]
_TINY_EDITS = _TINY_LM + [
    _narrow("input_size", 512, 64, lines=2),  # flow and encoder
    _narrow("output_size", 512, 64),          # encoder
    _narrow("attention_heads", 8, 2), _narrow("linear_units", 2048, 128), _narrow("num_blocks", 6, 2),
    _narrow("channels", [256], [64]), _narrow("attention_head_dim", 64, 32), _narrow("n_blocks", 4, 1),
    _narrow("num_mid_blocks", 12, 1), _narrow("num_heads", 8, 2),
] + _TINY_HIFT

# CosyVoice3: the DiT estimator (dim divisible by its 16 position-conv groups) and the pre-lookahead
# width narrowed. Mel and speaker widths (80) stay.
_TINY_EDITS_COSYVOICE3 = _TINY_LM + [
    _narrow("channels", 1024, 64),  # pre_lookahead_layer
    _narrow("dim", 1024, 64), _narrow("depth", 22, 2), _narrow("heads", 16, 2), _narrow("dim_head", 64, 32),
] + _TINY_HIFT

TINY_QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096)


@dataclass(frozen=True)
class Template:
    """What the generator needs of a family besides its model class: the tiny edits of its yaml
    and the version of its speech tokenizer."""
    family: Family
    tiny_edits: list
    speech_tokenizer_version: int


TEMPLATES = {
    "cosyvoice2": Template(COSYVOICE2, _TINY_EDITS, 2),
    "cosyvoice3": Template(COSYVOICE3, _TINY_EDITS_COSYVOICE3, 3),
}
assert set(TEMPLATES) == set(FAMILIES)


def _template(family: str) -> Template:
    if family not in TEMPLATES:
        raise ValueError(f"family must be one of {tuple(TEMPLATES)}, not {family!r}")
    return TEMPLATES[family]


def official_yaml_text(family: str = "cosyvoice2") -> str:
    name = _template(family).family.yaml
    return resources.files("light_tts.tools").joinpath(f"assets/{name}").read_text(encoding="utf-8")


def tiny_yaml_text(family: str = "cosyvoice2") -> str:
    text = official_yaml_text(family)
    for pattern, repl, count in _template(family).tiny_edits:
        text, n = re.subn(pattern, repl, text, flags=re.M)
        if n != count:
            raise RuntimeError(f"tiny yaml: {pattern!r} matched {n} lines, expected {count}")
    return "# tiny random model: the official structure with small widths (light_tts make_random_model)\n" + text


def _init_llm_(module: nn.Module, std: float = 0.02) -> None:
    # Qwen2's own initialiser: N(0, 0.02) weights, zero biases, unit norms.
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _size_of(path: str) -> str:
    return f"{os.path.getsize(path) / 2**20:.1f} MiB"


def make_random_model(out: str, size: str = "tiny", seed: int = 0, log=print, family: str = "cosyvoice2") -> dict:
    """Write the directory; return the parameter count of each network."""
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be tiny or full, not {size!r}")
    template = _template(family)
    from light_tts.tools.random_onnx import write_campplus_onnx, write_speech_tokenizer_onnx
    from light_tts.tools.tokenizer_files import write_tokenizer

    t_start = time.perf_counter()
    blank = os.path.join(out, "CosyVoice-BlankEN")
    os.makedirs(blank, exist_ok=True)

    def step(msg: str) -> None:
        log(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    vocab = write_tokenizer(blank, size, family)
    step(f"tokenizer: {vocab} tokens -> {blank}")
    qwen = Qwen2Config() if size == "full" else Qwen2Config(**TINY_QWEN2, vocab_size=-(-vocab // 64) * 64)
    if qwen.vocab_size < vocab:
        raise RuntimeError(f"tokenizer has {vocab} tokens but the Qwen2 vocab is {qwen.vocab_size}")
    with open(os.path.join(blank, "config.json"), "w", encoding="utf-8") as f:
        json.dump(qwen.to_json_dict(), f, indent=2)
    with open(os.path.join(blank, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 151643, "eos_token_id": 151643, "max_new_tokens": 2048}, f, indent=2)
    with open(os.path.join(out, template.family.yaml), "w", encoding="utf-8") as f:
        f.write(official_yaml_text(family) if size == "full" else tiny_yaml_text(family))
    model_cls = model_class(family)
    cfg = model_cls.load_config(out)

    counts = {}
    for i, name in enumerate(("llm", "flow", "hift")):
        torch.manual_seed(seed * 1000 + i)
        module = model_cls.build(name, cfg).eval()
        if name == "llm":
            _init_llm_(module)
        counts[name] = _count(module)
        path = os.path.join(out, f"{name}.pt")
        torch.save(module.state_dict(), path)
        step(f"{name}: {counts[name] / 1e6:.1f} M parameters -> {path} ({_size_of(path)})")
        if name == "llm":
            _write_blank_en_weights(module, qwen, blank)
            step(f"Qwen2 body -> {blank}/model.safetensors ({_size_of(os.path.join(blank, 'model.safetensors'))})")
        del module

    tokenizer_onnx = template.family.speech_tokenizer
    write_campplus_onnx(os.path.join(out, "campplus.onnx"), seed)
    write_speech_tokenizer_onnx(os.path.join(out, tokenizer_onnx), seed, template.speech_tokenizer_version)
    step(f"campplus.onnx and {tokenizer_onnx} written")
    total = sum(counts.values())
    step(f"done: {out} ({template.family.title}: llm {counts['llm'] / 1e6:.1f} M, flow {counts['flow'] / 1e6:.1f} M, "
         f"hift {counts['hift'] / 1e6:.1f} M, total {total / 1e6:.1f} M parameters)")
    return counts


def _write_blank_en_weights(llm: nn.Module, qwen: Qwen2Config, blank: str) -> None:
    """The official loader first builds Qwen2ForCausalLM from CosyVoice-BlankEN/ (then llm.pt
    overwrites every weight), so the directory carries the body's weights too, in bf16 as released."""
    from safetensors.torch import save_file
    body = {}
    for k, v in llm.state_dict().items():
        if k.startswith("llm.model."):
            name = k[len("llm.model."):]
            if name == "lm_head.weight" and qwen.tie_word_embeddings:
                continue  # tied to model.embed_tokens.weight; transformers saves it once
            body[name] = v.to(torch.bfloat16).contiguous()
    save_file(body, os.path.join(blank, "model.safetensors"), metadata={"format": "pt"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=tuple(TEMPLATES), default="cosyvoice2",
                   help="cosyvoice2 (CosyVoice2-0.5B layout) or cosyvoice3 (Fun-CosyVoice3-0.5B-2512 layout)")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="tiny: small widths for CPU tests; full: the official 0.5B sizes "
                        "(~3.4 GB on disk for cosyvoice2, ~4.4 GB for cosyvoice3)")
    p.add_argument("--out", required=True, help="directory to write (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same weights")
    args = p.parse_args(argv)
    make_random_model(args.out, args.size, args.seed, family=args.family)
    return 0


if __name__ == "__main__":
    sys.exit(main())
