"""The req_to_token table: row r maps request r's positions 0..len-1 to KV pool slots.

    req_to_token   int32 [max_reqs + 1, max_req_len] on the model's device

A CPU mirror (`cpu`, numpy) holds the same table, so the engine reads a request's slots (to free
them) without a device round trip. Rows are handed out per running request (alloc / free, a free list on the CPU). The last row
(`pad_row`) is the padding request of CUDA-graph batches: every entry points at the pool's
padding slot, so a padded batch entry reads and writes only that slot.
"""
from __future__ import annotations

import numpy as np
import torch


class ReqManager:
    def __init__(self, max_reqs: int, max_req_len: int, pad_slot: int, device):
        self.max_reqs = int(max_reqs)
        self.max_req_len = int(max_req_len)
        self.pad_row = self.max_reqs
        self.req_to_token = torch.full((self.max_reqs + 1, self.max_req_len), pad_slot, dtype=torch.int32,
                                       device=device)
        self.cpu = np.full((self.max_reqs + 1, self.max_req_len), pad_slot, dtype=np.int32)
        self._free = list(range(self.max_reqs - 1, -1, -1))   # pop() gives the lowest row first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise RuntimeError(f"req_to_token: all {self.max_reqs} rows in use")
        return self._free.pop()

    def free(self, row: int) -> None:
        if not 0 <= row < self.max_reqs or row in self._free:
            raise ValueError(f"req_to_token: row {row} is not allocated")
        self._free.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Positions start.. of `row` live in `slots`."""
        n = int(slots.numel())
        if start + n > self.max_req_len:
            raise ValueError(f"req_to_token: {start + n} positions exceed max_req_len {self.max_req_len}")
        self.req_to_token[row, start:start + n] = slots.to(self.req_to_token.device, torch.int32)
        self.cpu[row, start:start + n] = slots.numpy()

    def slots(self, row: int, start: int, end: int) -> torch.Tensor:
        """Slots of positions start..end-1 of `row` (int64 CPU, from the mirror)."""
        return torch.from_numpy(self.cpu[row, start:end].astype(np.int64))
