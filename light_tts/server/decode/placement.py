"""Which device decode process i runs on: GPU i % (visible GPUs), else the CPU.

Pure functions (no torch, no CUDA calls) so the assignment is testable anywhere.
CUDA_VISIBLE_DEVICES follows CUDA's rules: a comma list of indices or GPU-/MIG- UUIDs, cut at the
first entry that is not one of those; empty or "-1" hides every GPU. Torch numbers the visible
GPUs 0..n-1, so the device string is always cuda:<i % n>; `physical_gpu` says which card that is.
"""
from __future__ import annotations

import re
from typing import Optional

_ENTRY = re.compile(r"^(\d+|GPU-[0-9a-fA-F-]+|MIG-[\w/-]+)$")


def visible_gpus(cuda_visible_devices: Optional[str], device_count: int) -> list[str]:
    """The physical ids (or UUIDs) that torch's cuda:0, cuda:1, ... stand for.

    device_count is what torch reports (it already honours CUDA_VISIBLE_DEVICES); the list is cut
    to it, so an index past the machine's cards drops out as CUDA drops it."""
    if cuda_visible_devices is None:
        return [str(i) for i in range(device_count)]
    out = []
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if not _ENTRY.match(entry):
            break  # CUDA ignores everything from the first invalid entry on ("-1" hides all)
        out.append(entry)
    return out[:device_count]


def decode_device(index: int, num_visible: int) -> str:
    """Device string of decode process `index` given `num_visible` GPUs."""
    if index < 0:
        raise ValueError(f"decode process index must be >= 0, got {index}")
    return f"cuda:{index % num_visible}" if num_visible > 0 else "cpu"


def physical_gpu(index: int, cuda_visible_devices: Optional[str], device_count: int) -> Optional[str]:
    """The physical card (nvidia-smi index or UUID) of decode process `index`; None on the CPU."""
    gpus = visible_gpus(cuda_visible_devices, device_count)
    return gpus[index % len(gpus)] if gpus else None
