"""Prompt prefix cache: KV slots of [sos, prompt_text...] kept across requests and text pieces.

The LM input is [sos, prompt_text + text_piece, task_id, prompt_speech]. Attention is causal and
positions start at 0, so the K/V of the first 1 + len(prompt_text) tokens depend on those tokens
only: every piece of every request with the same prompt text (a registered voice, or the pieces
of one request) shares them. The text piece follows right after, so nothing later is shareable
(the prompt speech tokens come after the piece).

An entry owns its slots in the pool; running requests that use it hold a reference (their
req_to_token rows point at its slots). Entries with no reference stay cached and are evicted
least recently used first when the pool needs room or more than `max_entries` are kept.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from light_tts.server.llm.mem_manager import KVPool


@dataclass(eq=False)
class PrefixEntry:
    key: tuple
    slots: torch.Tensor      # int64 CPU [len(key) + 1]: sos + prompt text
    refs: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.slots.numel())


class PrefixCache:
    def __init__(self, pool: KVPool, max_entries: int = 64):
        self.pool = pool
        self.max_entries = int(max_entries)
        self.entries: "OrderedDict[tuple, PrefixEntry]" = OrderedDict()   # least recently used first
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def lookup(self, key: tuple) -> Optional[PrefixEntry]:
        """The entry for `key` with a new reference taken, or None (a miss). Counts hits / misses."""
        if not self.enabled or not key:
            return None
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        entry.refs += 1
        return entry

    def insert(self, key: tuple, slots: torch.Tensor) -> Optional[PrefixEntry]:
        """Take ownership of `slots` (the prefix K/V just computed) as the entry for `key`, with one
        reference for the caller. None when disabled or already present (the caller keeps them)."""
        if not self.enabled or not key or key in self.entries:
            return None
        entry = PrefixEntry(key=key, slots=slots, refs=1)
        self.entries[key] = entry
        self._trim()
        return entry

    def release(self, entry: PrefixEntry) -> None:
        if entry.refs <= 0:
            raise ValueError("prefix cache: releasing an entry with no reference")
        entry.refs -= 1
        if self.entries.get(entry.key) is not entry and entry.refs == 0:   # dropped from the index while in use
            self.pool.free(entry.slots)
        else:
            self._trim()

    def evictable_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries.values() if e.refs == 0)

    def evict(self, need_free: int) -> None:
        """Free unreferenced entries (least recently used first) until the pool has `need_free` free."""
        for key in [k for k, e in self.entries.items() if e.refs == 0]:
            if self.pool.num_free >= need_free:
                return
            self.pool.free(self.entries.pop(key).slots)

    def clear(self) -> None:
        """Drop every unreferenced entry (referenced ones are freed by their last release)."""
        for key in list(self.entries):
            entry = self.entries.pop(key)
            if entry.refs == 0:
                self.pool.free(entry.slots)

    def _trim(self) -> None:
        for key in [k for k, e in self.entries.items() if e.refs == 0]:
            if len(self.entries) <= self.max_entries:
                return
            self.pool.free(self.entries.pop(key).slots)
