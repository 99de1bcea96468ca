"""Batched decode engine: speech-token chunks of many requests -> audio in one flow and one HiFT call.

  placement.py     which GPU decode process i uses
  batched_flow.py  per-request encoder, padded batch, one Euler loop with CFG over all requests
  batched_hift.py  one HiFT call over mels of different lengths (masked, per-request NSF noise)
  cuda_graph.py    the Euler loop captured as CUDA graphs per (batch, frames) bucket
  compile.py       torch.compile of the estimator step and the HiFT network, warmed up at start
  onnx_export.py   the estimator (with an explicit attention bias input) -> ONNX
  trt.py           TensorRT engine for the estimator, built from that ONNX and cached by the model
  engine.py        DecodeEngine: Chunk jobs of many StreamingDecoders -> audio, one step at a time
"""
