"""The token-level KV pool (LightLLM style): one allocation of `size` token slots for every layer.

    k[l], v[l]      [size + 1, Hkv, D]   layer l's keys / values (model dtype), or with int8=True
    k[l], v[l]      int8 codes of the same shape plus k_scale[l], v_scale[l] [size + 1, Hkv]

Slot `size` (the last one) is the padding slot: padded rows of a CUDA-graph batch write and read
it, real requests never own it. It is zero-initialised so padding never produces NaN.

Free slots form a stack on the CPU (`_stack[:num_free]` are free): alloc(n) pops n, free(slots)
pushes them back; both cost O(n) and never fragment (a request's slots need not be contiguous:
req_to_token maps its positions to slots). A bool `_in_use` mask catches double frees and
foreign slots at once instead of corrupting another request's cache.
"""
from __future__ import annotations

import torch


class KVPoolFull(RuntimeError):
    pass


class KVPool:
    def __init__(self, size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device, int8: bool = False):
        if size < 1:
            raise ValueError(f"KV pool size must be >= 1, got {size}")
        self.size = int(size)
        self.num_layers = num_layers
        self.int8 = int8
        self.pad_slot = self.size
        shape = (num_layers, self.size + 1, num_kv_heads, head_dim)
        if int8:
            self.k_buf = torch.zeros(shape, dtype=torch.int8, device=device)
            self.v_buf = torch.zeros(shape, dtype=torch.int8, device=device)
            self.k_scale_buf = torch.zeros(shape[:3], dtype=torch.float32, device=device)
            self.v_scale_buf = torch.zeros(shape[:3], dtype=torch.float32, device=device)
        else:
            self.k_buf = torch.zeros(shape, dtype=dtype, device=device)
            self.v_buf = torch.zeros(shape, dtype=dtype, device=device)
            self.k_scale_buf = self.v_scale_buf = None
        self._stack = torch.arange(self.size, dtype=torch.int64)
        self._in_use = torch.zeros(self.size, dtype=torch.bool)
        self.num_free = self.size

    # ---- per layer views --------------------------------------------------------------------------

    def layer(self, i: int) -> tuple:
        """(k_cache, v_cache) or, int8, (k_i8, k_scale, v_i8, v_scale) of layer i."""
        if self.int8:
            return self.k_buf[i], self.k_scale_buf[i], self.v_buf[i], self.v_scale_buf[i]
        return self.k_buf[i], self.v_buf[i]

    def bytes(self) -> int:
        n = self.k_buf.numel() * self.k_buf.element_size() * 2
        if self.int8:
            n += self.k_scale_buf.numel() * 4 * 2
        return n

    # ---- slots ------------------------------------------------------------------------------------

    @property
    def num_used(self) -> int:
        return self.size - self.num_free

    def can_alloc(self, n: int) -> bool:
        return n <= self.num_free

    def alloc(self, n: int) -> torch.Tensor:
        """n free slots (int64 CPU tensor); raises KVPoolFull when fewer are free."""
        if n > self.num_free:
            raise KVPoolFull(f"KV pool: {n} slots asked, {self.num_free} free of {self.size}")
        start = self.num_free - n
        slots = self._stack[start:self.num_free].clone()
        self.num_free = start
        self._in_use[slots] = True
        return slots

    def free(self, slots: torch.Tensor) -> None:
        n = int(slots.numel())
        if n == 0:
            return
        slots = slots.reshape(-1).to(torch.int64).cpu()
        if int(slots.min()) < 0 or int(slots.max()) >= self.size or not bool(self._in_use[slots].all()) \
                or int(torch.unique(slots).numel()) != n:
            raise ValueError("KV pool: freeing slots that are not allocated (double free or foreign slot)")
        self._in_use[slots] = False
        self._stack[self.num_free:self.num_free + n] = slots
        self.num_free += n
