"""NVIDIA MPS (Multi-Process Service) for the stages sharing one GPU.

Without MPS, the LLM process and a decode process take turns on the GPU: the LLM's short steps wait
behind the time slices of the decode process's long flow calls, and the requests still waiting for
their first audio wait with them. Under MPS their kernels run side by side, and a client started with
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=P gets at most P% of the SMs, so `--decode_sm_percent P` keeps
(100 - P)% of the SMs free for the LLM's steps whatever decode is doing.

MPS is a daemon the operator starts (`nvidia-cuda-mps-control -d`, docs/deployment.md); the server
does not start it. The percentage is read once, when a process creates its CUDA context, so it is set
in the decode process's environment before torch touches the GPU.
"""
from __future__ import annotations

import os
from typing import MutableMapping, Optional

DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"
PERCENT_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


def pipe_directory(environ: Optional[MutableMapping[str, str]] = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIRECTORY


def mps_running(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """An MPS control daemon is listening where this process's CUDA would look for it."""
    return os.path.exists(os.path.join(pipe_directory(environ), "control"))


def limit_sms(percent: int, environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Before the process's first CUDA call: cap its share of the SMs under MPS. Returns a warning
    when it cannot take effect (no daemon), else None; percent 0 changes nothing."""
    environ = os.environ if environ is None else environ
    if not percent:
        return None
    environ[PERCENT_ENV] = str(percent)
    if not mps_running(environ):
        return (f"--decode_sm_percent {percent} has no effect: no MPS control daemon at "
                f"{pipe_directory(environ)} (start one with nvidia-cuda-mps-control -d, or set "
                "CUDA_MPS_PIPE_DIRECTORY to its pipe directory)")
    return None
