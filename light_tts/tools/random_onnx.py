"""Small random stand-ins for the two ONNX files of a CosyVoice2 or CosyVoice3 release.

They keep the interface of the official files, which is all our frontend relies on:

campplus.onnx (CAM++ speaker encoder)
    input  "input"  float32 [batch, frames, 80]   mean-normalised 80-bin Kaldi fbank
    output "output" float32 [batch, 192]          speaker embedding
speech_tokenizer_v2.onnx (S3 tokenizer v2, FSQ; CosyVoice2) and speech_tokenizer_v3.onnx (v3; CosyVoice3)
    input  "feats"        float32 [batch, 128, frames]  Whisper log-mel at 100 Hz
    input  "feats_length" int32   [batch]               valid mel frames
    output "indices"      int32   [batch, ceil(frames/4)]  speech tokens in [0, 6561)
    The official frontend calls v2 and v3 the same way (`_extract_speech_token`: inputs by position,
    128-bin Whisper log-mel at 16 kHz, lengths as int32, the first output flattened), so v3 keeps
    v2's interface; v3 differs in its weights only (here: another graph name and seed stream).

The graphs are built with onnx.helper (no exporter needed), have dynamic batch and
frame axes, run in well under a millisecond per second of audio on CPU and weigh
about 100 kB.  Weights come from numpy's seeded generator, so a seed gives the same
bytes on every machine.

The tokenizer mirrors the real network's outer structure where it sets the interface:
two stride-2 convolutions (k=3, pad=1) give the 4x downsampling, so the token count is
ceil(ceil(T/2)/2) = ceil(T/4) exactly as in the real model, and an FSQ head
(8 dims -> tanh -> round to {-1,0,1} -> base-3 digits) gives codes in [0, 3**8).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # loadable by older onnxruntime releases too

CAMPPLUS_FEAT_DIM = 80
CAMPPLUS_EMBED_DIM = 192
SPEECH_TOKENIZER_MELS = 128
FSQ_DIMS = 8   # 3 ** FSQ_DIMS = 6561 speech tokens

_HIDDEN = 64


def _randn(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _save(graph: onnx.GraphProto, path: str | os.PathLike, doc: str) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="light_tts.random_onnx", doc_string=doc)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(path))


def write_campplus_onnx(path: str | os.PathLike, seed: int = 0) -> None:
    """fbank [B, T, 80] -> embedding [B, 192]: frame MLP, mean over time, projection."""
    rng = np.random.default_rng(seed)
    w1 = _randn(rng, (CAMPPLUS_FEAT_DIM, _HIDDEN), 1.0 / np.sqrt(CAMPPLUS_FEAT_DIM))
    b1 = _randn(rng, (_HIDDEN,), 0.1)
    w2 = _randn(rng, (_HIDDEN, CAMPPLUS_EMBED_DIM), 1.0 / np.sqrt(_HIDDEN))
    b2 = _randn(rng, (CAMPPLUS_EMBED_DIM,), 0.1)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["frame_proj"]),
        helper.make_node("Add", ["frame_proj", "b1"], ["frame_pre"]),
        helper.make_node("Relu", ["frame_pre"], ["frame_hidden"]),
        # pooling over time makes the embedding independent of the utterance length
        helper.make_node("ReduceMean", ["frame_hidden"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w2"], ["embed_proj"]),
        helper.make_node("Add", ["embed_proj", "b2"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "campplus_random",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", CAMPPLUS_FEAT_DIM])],
        outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", CAMPPLUS_EMBED_DIM])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    _save(graph, path, f"random CAM++ stand-in, seed {seed}")


def write_speech_tokenizer_onnx(path: str | os.PathLike, seed: int = 0, version: int = 2) -> None:
    """log-mel [B, 128, T] + lengths [B] -> int32 codes [B, ceil(T/4)] in [0, 6561).
    version: 2 (speech_tokenizer_v2.onnx) or 3 (speech_tokenizer_v3.onnx), same interface."""
    if version not in (2, 3):
        raise ValueError(f"speech tokenizer version must be 2 or 3, not {version!r}")
    rng = np.random.default_rng(seed if version == 2 else [seed, version])
    conv1_w = _randn(rng, (_HIDDEN, SPEECH_TOKENIZER_MELS, 3), 1.0 / np.sqrt(3 * SPEECH_TOKENIZER_MELS))
    conv1_b = _randn(rng, (_HIDDEN,), 0.1)
    conv2_w = _randn(rng, (_HIDDEN, _HIDDEN, 3), 1.0 / np.sqrt(3 * _HIDDEN))
    conv2_b = _randn(rng, (_HIDDEN,), 0.1)
    # scaled up so tanh spreads over (-1, 1) and all three FSQ levels occur
    fsq_w = _randn(rng, (_HIDDEN, FSQ_DIMS), 3.0 / np.sqrt(_HIDDEN))
    fsq_b = _randn(rng, (FSQ_DIMS,), 0.1)
    consts = {
        "conv1_w": conv1_w, "conv1_b": conv1_b, "conv2_w": conv2_w, "conv2_b": conv2_b,
        "fsq_w": fsq_w, "fsq_b": fsq_b,
        "fsq_scale": np.array(0.999, np.float32),  # keeps |x| < 1 away from round-half ties at +-1
        "one_f": np.array(1.0, np.float32),
        "digit_weights": (3.0 ** np.arange(FSQ_DIMS)).astype(np.float32).reshape(FSQ_DIMS, 1),
        "three_i": np.array(3, np.int64), "four_i": np.array(4, np.int64),
        "zero_i": np.array(0, np.int64), "one_i": np.array(1, np.int64),
        "axis2": np.array([2], np.int64), "axis0": np.array([0], np.int64),
        "axis1": np.array([1], np.int64), "last_axis": np.array([-1], np.int64),
    }
    nodes = [
        # 4x downsampling: two stride-2 convolutions, k=3, pad=1 (as in the real model)
        helper.make_node("Conv", ["feats", "conv1_w", "conv1_b"], ["c1"], kernel_shape=[3], strides=[2], pads=[1, 1]),
        helper.make_node("Tanh", ["c1"], ["h1"]),
        helper.make_node("Conv", ["h1", "conv2_w", "conv2_b"], ["c2"], kernel_shape=[3], strides=[2], pads=[1, 1]),
        helper.make_node("Tanh", ["c2"], ["h2"]),  # [B, H, T4]
        # zero the frames past each item's length (padding in a batch)
        helper.make_node("Shape", ["h2"], ["h2_shape"]),
        helper.make_node("Gather", ["h2_shape", "axis2"], ["t4_vec"], axis=0),
        helper.make_node("Squeeze", ["t4_vec", "axis0"], ["t4"]),
        helper.make_node("Range", ["zero_i", "t4", "one_i"], ["frame_idx"]),          # [T4]
        helper.make_node("Cast", ["feats_length"], ["len64"], to=TensorProto.INT64),
        helper.make_node("Add", ["len64", "three_i"], ["len_plus"]),
        helper.make_node("Div", ["len_plus", "four_i"], ["len4"]),                     # ceil(len/4)
        helper.make_node("Unsqueeze", ["len4", "last_axis"], ["len4_col"]),            # [B, 1]
        helper.make_node("Less", ["frame_idx", "len4_col"], ["valid"]),                # [B, T4]
        helper.make_node("Cast", ["valid"], ["valid_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["valid_f", "axis1"], ["valid_b1t"]),            # [B, 1, T4]
        helper.make_node("Mul", ["h2", "valid_b1t"], ["h_masked"]),
        helper.make_node("Transpose", ["h_masked"], ["h_btc"], perm=[0, 2, 1]),        # [B, T4, H]
        # FSQ: project to 8 dims, bound with tanh, round to {-1, 0, 1}, read as base 3
        helper.make_node("MatMul", ["h_btc", "fsq_w"], ["fsq_proj"]),
        helper.make_node("Add", ["fsq_proj", "fsq_b"], ["fsq_pre"]),
        helper.make_node("Tanh", ["fsq_pre"], ["fsq_tanh"]),
        helper.make_node("Mul", ["fsq_tanh", "fsq_scale"], ["fsq_scaled"]),
        helper.make_node("Round", ["fsq_scaled"], ["fsq_round"]),
        helper.make_node("Add", ["fsq_round", "one_f"], ["fsq_digits"]),               # {0, 1, 2}
        helper.make_node("MatMul", ["fsq_digits", "digit_weights"], ["code_col"]),     # [B, T4, 1]
        helper.make_node("Squeeze", ["code_col", "last_axis"], ["code_f"]),
        helper.make_node("Cast", ["code_f"], ["indices"], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes, f"speech_tokenizer_v{version}_random",
        inputs=[
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["B", SPEECH_TOKENIZER_MELS, "T"]),
            helper.make_tensor_value_info("feats_length", TensorProto.INT32, ["B"]),
        ],
        outputs=[helper.make_tensor_value_info("indices", TensorProto.INT32, ["B", "T4"])],
        initializer=[numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    _save(graph, path, f"random S3 tokenizer v{version} stand-in, seed {seed}")
