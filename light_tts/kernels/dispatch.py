"""Pick the Triton kernel or its plain-PyTorch reference, per call.

Every function here has the signature of the same-named function in light_tts.kernels.reference.
A call runs the Triton version (function `<name>` of module light_tts.kernels.<name>, or of any
other module of this package that defines it) when its first tensor argument is on a CUDA
device, Triton imports, and the backend is not forced to the reference; otherwise it runs the
reference. Force a backend with the environment variable LIGHTTTS_KERNELS=reference|triton|auto
(default auto) or `set_backend(...)` (tests, benchmarks). With "triton" a missing kernel is an
error instead of a silent fallback.
"""
from __future__ import annotations

import importlib
import logging
import contextlib
import os
import pkgutil
from typing import Callable, Optional

from light_tts.kernels import reference

log = logging.getLogger("lighttts")

NAMES = ("store_kv", "context_attention", "decode_attention", "rms_norm", "add_rms_norm", "silu_mul", "rotary",
         "store_kv_int8", "decode_attention_int8", "context_attention_int8", "frame_norm", "flow_attention")
BACKENDS = ("auto", "reference", "triton")

_backend = os.environ.get("LIGHTTTS_KERNELS", "auto").strip().lower() or "auto"
_triton: dict[str, Optional[Callable]] = {}


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def using(name: str):
    """Run a block with kernel backend `name`, then restore the one before (tests compare backends)."""
    before = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def _find_triton(name: str) -> Optional[Callable]:
    """The Triton implementation of `name`, or None (cached)."""
    if name in _triton:
        return _triton[name]
    fn = None
    try:
        import triton  # noqa: F401
    except Exception:
        _triton[name] = None
        return None
    import light_tts.kernels as pkg
    modules = [name] + sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                              if m.name not in (name, "reference", "dispatch"))
    for mod_name in modules:
        try:
            mod = importlib.import_module(f"light_tts.kernels.{mod_name}")
        except ImportError as e:
            if mod_name == name:
                log.debug("no Triton kernel module for %s: %s", name, e)
            continue
        fn = getattr(mod, name, None)
        if callable(fn):
            break
        fn = None
    _triton[name] = fn
    return fn


def kernel(name: str, device_type: str) -> Callable:
    """The function that serves `name` for tensors on `device_type` under the current backend."""
    if name not in NAMES:
        raise KeyError(name)
    ref = getattr(reference, name)
    if _backend == "reference" or device_type != "cuda":
        if _backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"kernel backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1) for {name}")
        if _backend != "triton":
            return ref
    fn = _find_triton(name)
    if fn is None:
        if _backend == "triton":
            raise RuntimeError(f"kernel backend 'triton' but no Triton implementation of {name} imports")
        return ref
    return fn


def triton_available(name: str) -> bool:
    return _find_triton(name) is not None


def _make(name: str) -> Callable:
    ref = getattr(reference, name)

    def call(*args, **kwargs):
        return kernel(name, args[0].device.type)(*args, **kwargs)
    call.__name__ = name
    call.__qualname__ = name
    call.__doc__ = ref.__doc__
    return call


store_kv = _make("store_kv")
context_attention = _make("context_attention")
decode_attention = _make("decode_attention")
rms_norm = _make("rms_norm")
add_rms_norm = _make("add_rms_norm")
silu_mul = _make("silu_mul")
rotary = _make("rotary")
store_kv_int8 = _make("store_kv_int8")
decode_attention_int8 = _make("decode_attention_int8")
context_attention_int8 = _make("context_attention_int8")
frame_norm = _make("frame_norm")
flow_attention = _make("flow_attention")
