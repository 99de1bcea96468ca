"""The decode stage: its process loop and its batched engine (speech-token chunks of many
requests -> audio in one flow and one HiFT call).

  process.py          the stage process: messages in, batches picked, audio out to the HTTP workers
  engine.py           DecodeEngine: Chunk jobs of many StreamingDecoders -> audio, one step at a
                      time; build_engine picks the speed paths below
  placement.py        which GPU decode process i uses
  batched_flow.py     one encoder call for all rows, padded batch, one Euler loop with CFG over all
  batched_hift.py     one HiFT call over mels of different lengths (masked, per-request NSF noise)
  fused_estimator.py  the estimator's forward in fewer kernels (GPU default)
  prompt_cache.py     per voice, the estimator's state over the fixed prompt frames (opt-in)
  cuda_graph.py       the Euler loop (and small batches' encoder and HiFT) as CUDA graphs per bucket
  compile.py          torch.compile of the estimator step and the HiFT network; start-up warm-up
  onnx_export.py      the estimator (with an explicit attention bias input) -> ONNX
  trt.py              TensorRT engine for the estimator, built from that ONNX and cached by the model

The plain one-request reference these are checked against is light_tts.models.token2wav.
"""
