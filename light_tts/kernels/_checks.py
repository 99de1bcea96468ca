"""Argument checks shared by the Triton wrappers (plain Python: shapes, dtypes, strides, devices).

They run on every call, so they only look at metadata: no tensor values (that would sync the
device and break CUDA-graph capture)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_rank(name: str, t: torch.Tensor, rank: int) -> None:
    check(t.dim() == rank, f"{name} must have {rank} dims, got shape {tuple(t.shape)}")


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    check(t.stride(-1) == 1, f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    check(len(set(devices.values())) == 1, f"tensors on different devices: {devices}")


def check_head_dim(d: int) -> None:
    # tl.dot needs every block dim >= 16 and tl.arange a power of two.
    check(d >= 16 and d & (d - 1) == 0, f"head_dim must be a power of two >= 16, got {d}")


def check_kv_cache(name: str, cache: torch.Tensor, hkv: int, d: int) -> None:
    check_rank(name, cache, 3)
    check(tuple(cache.shape[1:]) == (hkv, d), f"{name} must be [slots + 1, {hkv}, {d}], got {tuple(cache.shape)}")
    check(cache.is_contiguous(), f"{name} must be contiguous")


def check_index(name: str, t: torch.Tensor, length: int) -> None:
    check(t.dim() == 1 and t.shape[0] == length, f"{name} must be [{length}], got shape {tuple(t.shape)}")
    check(t.dtype in INDEX_DTYPES, f"{name} must be int32 or int64, got {t.dtype}")
    check(t.is_contiguous(), f"{name} must be contiguous")


def check_req_to_token(req_to_token: torch.Tensor) -> None:
    check_rank("req_to_token", req_to_token, 2)
    check(req_to_token.dtype in INDEX_DTYPES, f"req_to_token must be int32 or int64, got {req_to_token.dtype}")
    check_last_contiguous("req_to_token", req_to_token)


def check_scale(name: str, scale: torch.Tensor, cache: torch.Tensor) -> None:
    check(tuple(scale.shape) == tuple(cache.shape[:2]),
          f"{name} must be {tuple(cache.shape[:2])} (one scale per slot and head), got {tuple(scale.shape)}")
    check(scale.dtype in FLOAT_DTYPES, f"{name} must be a float tensor, got {scale.dtype}")
    check(scale.is_contiguous(), f"{name} must be contiguous")
    check(cache.dtype == torch.int8, f"int8 KV cache must be int8, got {cache.dtype}")


def attention_out(q: torch.Tensor, hkv: int, out) -> torch.Tensor:
    """The attention kernels' output: `out` checked against q (or a new one), after checking that
    q's heads group evenly over the kv heads (GQA)."""
    hq = q.shape[1]
    check(hq % hkv == 0, f"q heads {hq} must be a multiple of kv heads {hkv}")
    if out is None:
        out = torch.empty_like(q)
    check(out.shape == q.shape and out.dtype == q.dtype, f"out must be {q.dtype} {tuple(q.shape)}")
    check_last_contiguous("out", out)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products (the default would be tf32 on tensor cores)."""
    return "ieee" if dtype == torch.float32 else "tf32"
