"""TensorRT engine for the flow estimator (--load_trt).

The engine is built from our ONNX export (onnx_export.py: attention bias as an input, dynamic
batch and frames) and cached next to the model as flow.decoder.estimator.<dtype>.plan, with the
ONNX beside it as flow.decoder.estimator.lighttts.fp32.onnx. A cached plan is reused when its
inputs are ours and its profile covers the batch this process needs; otherwise it is rebuilt.
The engine's inputs and output are fp32 (the ONNX graph is fp32); fp16/bf16 are builder flags.

Shapes past the profile (very long sentences) fall back to the PyTorch estimator for that call.
"""
from __future__ import annotations

import copy
import logging
import os

import torch

from light_tts.server.decode.onnx_export import INPUT_NAMES, OUTPUT_NAMES, export_estimator

log = logging.getLogger("lighttts")

INSTALL_HINT = ("--load_trt needs NVIDIA TensorRT's Python package, which is not installed: "
                "`pip install tensorrt` (TensorRT 10 for CUDA 12, e.g. `pip install tensorrt-cu12`), "
                "or start without --load_trt")
MIN_FRAMES, OPT_FRAMES, MAX_FRAMES = 4, 500, 1500   # frames per flow call (prompt + sentence), 50 Hz
WORKSPACE_BYTES = 4 << 30


def require_tensorrt():
    """The tensorrt module, or RuntimeError saying what to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise RuntimeError(INSTALL_HINT) from e
    return tensorrt


def plan_path(model_dir: str, data_type: str) -> str:
    return os.path.join(model_dir, f"flow.decoder.estimator.{data_type}.plan")


def onnx_path(model_dir: str) -> str:
    return os.path.join(model_dir, "flow.decoder.estimator.lighttts.fp32.onnx")


def build_plan(onnx_file: str, plan_file: str, data_type: str, max_batch: int, channels: int) -> None:
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_file, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if data_type == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif data_type == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    opt_batch = max(2, min(max_batch, 16))

    def shapes(name):
        b = (2, opt_batch, max_batch)
        f = (MIN_FRAMES, OPT_FRAMES, MAX_FRAMES)
        return {"x": [(b[i], channels, f[i]) for i in range(3)],
                "mask": [(b[i], 1, f[i]) for i in range(3)],
                "mu": [(b[i], channels, f[i]) for i in range(3)],
                "t": [(b[i],) for i in range(3)],
                "spks": [(b[i], channels) for i in range(3)],
                "cond": [(b[i], channels, f[i]) for i in range(3)],
                "attn_bias": [(b[i], 1, f[i], f[i]) for i in range(3)]}[name]

    for name in INPUT_NAMES:
        profile.set_shape(name, *shapes(name))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the estimator engine (see its log above)")
    tmp = plan_file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(plan)
    os.replace(tmp, plan_file)


class TrtEstimator:
    """Callable like BiasEstimator: (x, mask, mu, t, spks, cond, attn_bias) -> velocity."""

    def __init__(self, plan_file: str, fallback, device: str):
        trt = require_tensorrt()
        self.fallback, self.device = fallback, torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(plan_file, "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeError(f"{plan_file}: not a TensorRT engine for this TensorRT/GPU")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        self.compatible = names == set(INPUT_NAMES) | set(OUTPUT_NAMES)
        if self.compatible:
            self.max_batch = self.engine.get_tensor_profile_shape("x", 0)[2][0]
            self.max_frames = self.engine.get_tensor_profile_shape("x", 0)[2][2]
            self.context = self.engine.create_execution_context()

    @classmethod
    def load_or_build(cls, estimator, model_dir: str, data_type: str, device: str, max_batch_size: int):
        """estimator: the BiasEstimator (its module supplies the ONNX export and the fallback)."""
        require_tensorrt()
        plan = plan_path(model_dir, data_type)
        if os.path.exists(plan):
            runner = cls(plan, estimator, device)
            if runner.compatible and runner.max_batch >= max_batch_size:
                log.info("TensorRT estimator: %s", plan)
                return runner
            log.info("TensorRT estimator: %s does not fit (not ours or batch too small); rebuilding", plan)
        onnx_file = onnx_path(model_dir)
        if not os.path.exists(onnx_file):
            log.info("exporting the estimator to %s", onnx_file)
            export_estimator(copy.deepcopy(estimator).float(), onnx_file)
        log.info("building the TensorRT engine %s (batch <= %d, frames <= %d); this takes minutes once",
                 plan, max_batch_size, MAX_FRAMES)
        build_plan(onnx_file, plan, data_type, max_batch_size, estimator.estimator.out_channels)
        return cls(plan, estimator, device)

    def __call__(self, x, mask, mu, t, spks, cond, attn_bias):
        b, _, frames = x.shape
        if b > self.max_batch or frames > self.max_frames or frames < MIN_FRAMES:
            return self.fallback(x, mask, mu, t, spks, cond, attn_bias)
        dtype = x.dtype
        inputs = [a.float().contiguous() for a in (x, mask, mu, t, spks, cond, attn_bias)]
        out = torch.empty(b, x.size(1), frames, device=x.device, dtype=torch.float32)
        for name, tensor in zip(INPUT_NAMES, inputs):
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAMES[0], out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT estimator execution failed")
        return out.to(dtype)
