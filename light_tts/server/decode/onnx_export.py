"""Export the flow estimator (BiasEstimator: the attention bias is an input) to ONNX.

Inputs x, mask, mu, t, spks, cond, attn_bias; output velocity. Dynamic axes: the (doubled) batch
and the frame count, so one file (and one TensorRT engine with a dynamic profile) serves every
chunk. The official export has no attn_bias input (its engine ignores the streaming chunk
mask); ours keeps per-row chunk masks, so an official .onnx/.plan is not interchangeable.

Uses the TorchScript exporter (dynamo=False): it needs only `onnx`, which the package already
depends on (the dynamo exporter would also need `onnxscript`).
"""
from __future__ import annotations

import os
import warnings

import torch

from light_tts.server.decode.batched_flow import BiasEstimator, attention_bias
from light_tts.models.flow.masks import valid_mask

INPUT_NAMES = ("x", "mask", "mu", "t", "spks", "cond", "attn_bias")
OUTPUT_NAMES = ("velocity",)
OPSET = 18


def example_inputs(estimator: BiasEstimator, batch: int = 2, frames: int = 120, lengths=None,
                   streaming=None, generator=None) -> tuple[torch.Tensor, ...]:
    """Random estimator inputs with right padding (`lengths`) and per-row mask kinds."""
    p = next(estimator.parameters())
    dev, dtype = p.device, p.dtype
    est = estimator.estimator
    c = est.out_channels
    lengths = torch.tensor(lengths or [frames] * batch, device=dev)
    streaming = torch.tensor(streaming or [True] * batch, device=dev)
    fm = valid_mask(lengths, frames)
    mask = fm.to(dtype)
    rnd = lambda *shape: torch.randn(*shape, generator=generator).to(dev, dtype)
    x, mu, cond = rnd(batch, c, frames), rnd(batch, c, frames) * mask, rnd(batch, c, frames) * mask
    t = torch.rand(batch, generator=generator).to(dev, dtype)
    spks = rnd(batch, c)
    bias = attention_bias(fm, streaming, int(est.static_chunk_size), dtype)
    return x, mask, mu, t, spks, cond, bias


def export_estimator(estimator: BiasEstimator, path: str, opset: int = OPSET) -> str:
    """Write the ONNX file (fp32 graph of the module's current dtype/device); returns `path`."""
    args = example_inputs(estimator, batch=2, frames=120, lengths=[120, 87], streaming=[True, False])
    dynamic = {"x": {0: "batch", 2: "frames"}, "mask": {0: "batch", 2: "frames"},
               "mu": {0: "batch", 2: "frames"}, "t": {0: "batch"}, "spks": {0: "batch"},
               "cond": {0: "batch", 2: "frames"}, "attn_bias": {0: "batch", 2: "frames", 3: "frames"},
               "velocity": {0: "batch", 2: "frames"}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values
        torch.onnx.export(estimator, args, tmp, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
    os.replace(tmp, path)
    return path
