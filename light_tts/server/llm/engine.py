"""The LLM stage's engine: router, token-slot KV pool, batched forward and sampling.

No sockets here (light_tts.server.llm.process owns them), so the engine is testable in-process.

Per request (LLMReq) and per text piece (sentence) it generates what `Qwen2LM.inference(piece,
prompt_text_ids, prompt_speech_tokens, seed=..., max_new_tokens=..., fixed_new_tokens=...)`
yields, as light_tts.synthesize calls it for each sentence (same length bounds and sampling
rules, the request's seed re-applied at the start of every piece); the pieces of one request run
one after another, requests run together. With the "exact" sampler (the CPU default) tokens are
identical to that call's; see light_tts.server.llm.sampler for the batched GPU sampler. The LM is
a CosyVoice2 Qwen2LM or a CosyVoice3LM: what differs (the tables of sos / task id, the stop ids, the
bistream policy, which text it reads) is asked of the model, never branched on here.

Parts (one owner each):
    KVPool (mem_manager)       token slots of every layer, alloc / free O(tokens)
    ReqManager (req_manager)   req_to_token rows
    PrefixCache (prefix_cache) shared K/V of [sos, prompt_text]
    router                     admission estimate (estimated peak KV tokens)
    ModelRunner / DecodeGraphs packed prefill and decode forwards, CUDA graphs
    Sampler                    one call per step for the whole batch

A step is a prefill step or a decode step (LightLLM's continuous batching):
- prefill when an admitted request waits for one (its next text piece, or a paused request:
  at once, so its timeline stays what the admission estimate assumed), and new requests when
  nothing is decoding or after --router_max_wait_tokens decode steps since the last admission
  (never two admission prefills in a row while something decodes, so decoding always
  progresses): the admitted pieces first, then new requests from the waiting queue (FIFO) while
  fewer than --running_max_req_size run, the estimated peak KV of running + new fits
  --max_total_token_num, and the step's prompt tokens fit --batch_max_tokens. All of them go
  through one packed forward.
- decode: one token for every decoding request in one forward (a CUDA graph when one is
  captured for the batch size). If the pool cannot hold one more token per request (only
  possible with the optimistic estimate, --router_token_ratio > 0), unreferenced prefix-cache
  entries are evicted, then the most recently admitted decoding requests are paused: their slots
  are freed, their tokens and sampler state kept, and they are prefilled again (prompt + tokens so
  far) at the next prefill step with room. Nothing is lost or sent twice. `step(hold=rids)` leaves
  those requests out of the decode step (they keep their KV and place): the LLM process's yield of
  the GPU to a decoder's first chunks (light_tts.server.llm.process).
A finished piece frees its slots at once; the next piece is prefilled at the next step. Abort and
errors free everything the request holds at once.

Requests are Sequences of two kinds (light_tts.server.llm.sequence): SentenceSequence (all text
known up front, the pieces above) and BistreamSequence (text streamed in through add_text; each
input the bistream rules ask for is a prefill that extends its KV; after a fill it waits for text
holding its KV and row but out of every forward, so it never holds up the batch). The engine
schedules and runs both through one interface; the kind-specific rules live in sequence.py.
"""
from __future__ import annotations

import logging
import os
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Collection, Optional

import numpy as np
import torch

from light_tts.server.io_struct import LLMReq
from light_tts.server.llm.mem_manager import KVPool
from light_tts.server.llm.model_runner import ModelRunner
from light_tts.server.llm.prefix_cache import PrefixCache
from light_tts.server.llm.req_manager import ReqManager
from light_tts.server.llm.router import estimated_peak
from light_tts.server.llm.sampler import Sampler
from light_tts.server.llm.sequence import (LAST, SPEAK, WAIT, LengthExceeded, SeqConfig, Sequence,
                                           sequence_kind)

log = logging.getLogger("lighttts")

__all__ = ["LLMEngine", "Sequence", "StepResult", "TokenOutput"]

# (requests, tokens each) of the start-up prefill warm-up: single and packed batches, token counts
# on and off multiples of 16 (Triton specialises integer arguments on that).
WARM_PREFILL = ((1, 200), (2, 37), (4, 201), (16, 150))


@dataclass(slots=True)
class TokenOutput:
    """One request's new speech tokens of one step (the LLM process batches them per decoder)."""
    rid: str
    tokens: list                 # new speech token ids of text piece `piece`, past the silent-token rule
    piece: int = 0
    piece_done: bool = False     # piece `piece` has ended (eos or length limit)
    finished: bool = False       # the whole request has ended


@dataclass
class StepResult:
    outputs: list = field(default_factory=list)    # TokenOutput, at most one per request
    finished: list = field(default_factory=list)   # Sequences whose last piece ended this step
    errors: list = field(default_factory=list)     # (Sequence, message, status): dropped, answered
    admitted: list = field(default_factory=list)   # Sequences admitted this step (route them first)
    kind: str = "idle"                              # "prefill", "decode" or "idle"
    batch_size: int = 0                            # requests in this step's forward
    prefills: int = 0
    prefill_tokens: int = 0
    paused: int = 0


class LLMEngine:
    def __init__(self, llm, *, max_total_token_num: int, max_req_total_len: int, running_max_req_size: int,
                 batch_max_tokens: Optional[int] = None, router_max_wait_tokens: int = 8,
                 router_token_ratio: float = 0.0, router_max_new_token_len: int = 1024, greedy: bool = False,
                 int8_kv: bool = False, cuda_graph: bool = True, graph_max_batch_size: int = 64,
                 graph_max_len_in_batch: int = 32768, prefix_cache_entries: int = 64, sampler: str = "auto",
                 bistream_max_len: int = 3000):
        self.llm = llm                                  # light_tts.models.llm.Qwen2LM or CosyVoice3LM, eval mode
        self.device = llm.device
        self.init_limits(max_total_token_num, max_req_total_len, running_max_req_size, batch_max_tokens,
                         router_max_wait_tokens, router_token_ratio, router_max_new_token_len, bistream_max_len)
        self.init_memory(int8_kv, prefix_cache_entries)
        self.init_sampler(sampler, greedy)
        self.init_graphs(cuda_graph, graph_max_batch_size, graph_max_len_in_batch)
        self.init_queues()

    def init_limits(self, max_total_token_num, max_req_total_len, running_max_req_size, batch_max_tokens,
                    router_max_wait_tokens, router_token_ratio, router_max_new_token_len, bistream_max_len) -> None:
        self.max_total_token_num = int(max_total_token_num)
        self.max_req_total_len = int(max_req_total_len)
        self.running_max_req_size = int(running_max_req_size)
        self.batch_max_tokens = int(batch_max_tokens if batch_max_tokens is not None else max_req_total_len)
        self.router_max_wait_tokens = int(router_max_wait_tokens)
        self.router_token_ratio = float(router_token_ratio)
        self.router_max_new_token_len = int(router_max_new_token_len)
        self.bistream_max_len = min(int(bistream_max_len), self.max_req_total_len)
        if self.max_req_total_len > self.max_total_token_num or self.batch_max_tokens < self.max_req_total_len:
            raise ValueError("need max_req_total_len <= max_total_token_num and batch_max_tokens >= max_req_total_len")
        self.seq_cfg = SeqConfig(llm=self.llm, vocab_size=self.llm.llm.model.model.config.vocab_size,
                                 speech_token_size=self.llm.speech_token_size,
                                 max_req_total_len=self.max_req_total_len, bistream_max_len=self.bistream_max_len,
                                 router_max_new_token_len=self.router_max_new_token_len)

    def init_memory(self, int8_kv: bool, prefix_cache_entries: int) -> None:
        cfg = self.llm.llm.model.model.config
        self.pool = KVPool(self.max_total_token_num, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                           self.llm.dtype, self.device, int8=int8_kv)
        self.reqs = ReqManager(self.running_max_req_size, self.max_req_total_len, self.pool.pad_slot, self.device)
        self.prefix = PrefixCache(self.pool, prefix_cache_entries)
        self.runner = ModelRunner(self.llm, self.pool, self.reqs)

    def init_sampler(self, sampler: str, greedy: bool) -> None:
        if sampler == "auto":
            sampler = os.environ.get("LIGHTTTS_SAMPLER") or ("batched" if self.device.type == "cuda" else "exact")
        self.sampler = Sampler(self.llm.speech_token_size, mode=sampler, greedy=greedy, **self.llm.sampling)

    def init_graphs(self, cuda_graph: bool, graph_max_batch_size: int, graph_max_len_in_batch: int) -> None:
        """Decode CUDA graphs and the prefill warm-up (CUDA only)."""
        self.graphs = None
        if self.device.type != "cuda":
            return
        if cuda_graph:
            from light_tts.server.llm.cuda_graph import try_capture
            max_len = min(graph_max_len_in_batch, self.max_req_total_len)
            self.graphs = try_capture(self.runner, graph_max_batch_size, max_len,
                                      None if self.sampler.per_request_rng else self.sampler)
        try:
            self.warm_up_prefill()
        except Exception as e:  # noqa: BLE001 - a speed-up only: serve without it
            log.warning("prefill warm-up failed, serving without it: %s: %s", type(e).__name__, e)

    def init_queues(self) -> None:
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []             # admitted, in admission order
        self.wait_steps = 0                            # decode steps since new requests were last considered
        self.last_kind = "idle"
        self.num_paused = 0
        self._arrivals = 0

    @torch.inference_mode()
    def warm_up_prefill(self, shapes: tuple = WARM_PREFILL) -> None:
        """Packed prefills of a few batch shapes on dummy inputs, once at start, so that the first
        batched prefills of real requests do not pay for compiling new kernel specialisations
        (the first-chunk breakdown showed a 316 ms mean prefill at the first 16-request level against
        33 ms later). Slots and rows are given back; nothing is sampled."""
        hidden, dtype = self.llm.llm_input_size, self.llm.dtype
        for b, n in shapes:
            b, total = min(b, self.reqs.num_free), min(b, self.reqs.num_free) * n
            if b == 0 or total > min(self.pool.num_free, self.batch_max_tokens) or n > self.reqs.max_req_len:
                continue
            rows, slots = [self.reqs.alloc() for _ in range(b)], self.pool.alloc(total)
            try:
                for i, row in enumerate(rows):
                    self.reqs.write(row, 0, slots[i * n:(i + 1) * n])
                meta = torch.tensor([[row, i * n, n, n] for i, row in enumerate(rows)], dtype=torch.int32)
                meta = meta.t().contiguous().to(self.device)
                self.runner.prefill(torch.zeros(total, hidden, device=self.device, dtype=dtype),
                                    torch.arange(n).repeat(b).to(self.device), slots.to(self.device),
                                    meta[0], meta[1], meta[2], meta[3], n)
            finally:
                self.pool.free(slots)
                for row in rows:
                    self.reqs.free(row)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @classmethod
    def from_args(cls, llm, args, **overrides) -> "LLMEngine":
        kw = dict(max_total_token_num=args.max_total_token_num, max_req_total_len=args.max_req_total_len,
                  running_max_req_size=args.running_max_req_size, batch_max_tokens=args.batch_max_tokens,
                  router_max_wait_tokens=args.router_max_wait_tokens, router_token_ratio=args.router_token_ratio,
                  router_max_new_token_len=args.router_max_new_token_len, greedy=args.sample_close,
                  int8_kv="triton_int8kv" in args.mode or "ppl_int8kv" in args.mode,
                  cuda_graph=not args.disable_cudagraph, graph_max_batch_size=args.graph_max_batch_size,
                  graph_max_len_in_batch=args.graph_max_len_in_batch, bistream_max_len=args.bistream_max_len)
        kw.update(overrides)
        return cls(llm, **kw)

    # ---- requests in ------------------------------------------------------------------------

    def check(self, req: LLMReq) -> Optional[str]:
        """Why `req` can never run (the caller answers 400), or None."""
        return sequence_kind(req).check(req, self.seq_cfg)

    def add(self, req: LLMReq) -> Sequence:
        seed = int(req.seed) if req.seed is not None else random.SystemRandom().randrange(2**63)
        seq = sequence_kind(req)(req, self.seq_cfg, seed, self._arrivals, self._new_generator(seed))
        self._arrivals += 1
        self.waiting.append(seq)
        return seq

    def add_text(self, rid: str, tokens: list, finish: bool) -> bool:
        """More text (and/or its end) for bistream request `rid`; False if it is not here (ended)."""
        seq = self.find(rid)
        return seq is not None and seq.add_text(tokens, finish)

    def find(self, rid: str) -> Optional[Sequence]:
        return next((s for s in (*self.waiting, *self.running) if s.rid == rid), None)

    def abort(self, rid: str) -> Optional[Sequence]:
        """Drop `rid` at once (its KV slots and req_to_token row too); returns it, or None."""
        for i, seq in enumerate(self.waiting):
            if seq.rid == rid:
                del self.waiting[i]
                return seq
        for seq in self.running:
            if seq.rid == rid:
                self._drop(seq)
                return seq
        return None

    def has(self, rid: str) -> bool:
        return self.find(rid) is not None

    # ---- router ---------------------------------------------------------------------------------

    def is_busy(self) -> bool:
        return self.kv_used() >= self.router_token_ratio * self.max_total_token_num

    def estimated_peak(self, extra: tuple = ()) -> int:
        busy = self.is_busy()
        return estimated_peak([s.load(busy) for s in (*self.running, *extra)])

    def _available(self) -> int:
        return self.pool.num_free + self.prefix.evictable_tokens()

    def _schedule_prefill(self, res: StepResult, admit: bool) -> list[Sequence]:
        """Pieces to prefill now: waiting pieces of admitted requests, then (with `admit`) newly
        admitted requests."""
        first = next((s for s in self.running if s.needs_prefill), None)
        while first is not None and first.prefill_len() > self._available():
            holders = [h for h in self._idle_holders() if h is not first]   # optimistic estimate only
            if not holders:
                break
            self._pause(max(holders, key=lambda s: s.order))
            res.paused += 1
        budget, room = self.batch_max_tokens, self._available()
        batch: list[Sequence] = []
        pending = [s for s in self.running if s.needs_prefill and not s.empty]   # empty: _skip_empty
        for seq in pending:
            need = seq.prefill_len()
            if need > budget or need > room:
                break                                      # keep the order: earlier requests first
            batch.append(seq)
            budget -= need
            room -= need
        if not admit or len(batch) < len(pending):
            return batch                                   # admitted work is still waiting: admit nothing new
        busy = self.is_busy()
        loads = [s.load(busy) for s in self.running]
        while self.waiting and len(self.running) < self.running_max_req_size:
            seq = self.waiting[0]
            need = seq.prefill_len() if seq.needs_prefill else 0
            if need > budget or need > room:
                break
            loads.append(seq.load(busy))
            if estimated_peak(loads) > self.max_total_token_num:
                loads.pop()
                break
            self.waiting.popleft()
            seq.row = self.reqs.alloc()
            self.running.append(seq)
            res.admitted.append(seq)
            if need > 0 and not seq.empty:
                batch.append(seq)
                budget -= need
                room -= need
        return batch

    # ---- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, hold: Collection[str] = ()) -> StepResult:
        """One forward: a prefill of waiting work, else one decode step of every decoding request
        not in `hold` (rids left out of this step, still holding their KV: the LLM process holds back
        streams past their first chunk while a decoder on this GPU computes first chunks)."""
        res = StepResult()
        decoding = [s for s in self.running if s.decoding and s.rid not in hold]
        pending = any(s.needs_prefill for s in self.running)
        may_admit = not decoding or (self.wait_steps >= self.router_max_wait_tokens and self.last_kind != "prefill")
        if pending or (may_admit and self.waiting):
            batch = self._schedule_prefill(res, admit=may_admit)
            self._skip_empty(res)
            if may_admit:
                self.wait_steps = 0
            if batch:
                self._prefill(batch, res)
                self.last_kind = res.kind = "prefill"
                return res
            decoding = [s for s in self.running if s.decoding and s.rid not in hold]
        if decoding:
            self._decode(decoding, res)
            self.wait_steps += 1
            self.last_kind = res.kind = "decode"
        else:
            self.last_kind = "idle"
        return res

    def _skip_empty(self, res: StepResult) -> None:
        """Pieces with nothing to generate (max length 0) end without a forward."""
        for seq in list(self.running):
            while seq in self.running and not seq.decoding and seq.empty:
                self._end_piece(seq, [], res)

    def _prefill(self, batch: list, res: StepResult) -> None:
        xs, positions, meta, inserts, placed = [], [], [], [], []
        start = 0
        for seq in batch:
            try:
                x, n_new, total, insert = self._place(seq)
            except LengthExceeded as e:
                self._fail(seq, str(e), res, status=413)
                continue
            except Exception as e:  # this request's input is unusable: fail it alone
                log.exception("prefill input of %s failed", seq.rid)
                self._fail(seq, f"LLM prefill failed: {type(e).__name__}: {e}", res)
                continue
            xs.append(x)
            positions.append(torch.arange(total - n_new, total))
            meta.append((seq.row, start, n_new, total))
            inserts.append(insert)
            placed.append(seq)
            start += n_new
        if not placed:
            return
        try:
            m = torch.tensor(meta, dtype=torch.int32).t().contiguous().to(self.device)
            slots = torch.cat([self.reqs.slots(row, total - n, total) for row, _, n, total in meta])
            logits = self.runner.prefill(torch.cat(xs), torch.cat(positions).to(self.device), slots.to(self.device),
                                         m[0], m[1], m[2], m[3], max(n for _, _, n, _ in meta))
        except Exception as e:  # not attributable to one request: fail the batch, keep serving
            log.exception("prefill failed")
            for seq in placed:
                self._fail(seq, f"LLM prefill failed: {type(e).__name__}: {e}", res)
            return
        for seq, insert in zip(placed, inserts):
            if insert is not None:                    # a miss: its prefix becomes the cache entry
                n = len(insert) + 1
                entry = self.prefix.insert(insert, self.reqs.slots(seq.row, 0, n))
                if entry is not None:
                    seq.prefix, seq.own_start = entry, n
        res.batch_size = res.prefills = len(placed)
        res.prefill_tokens = start
        self._sample(placed, logits, res)

    def _place(self, seq: Sequence):
        """Slots (in req_to_token) and input rows of the sequence's next prefill. Returns (x [n_new, D],
        n_new, total, the prefix key to insert after the forward or None)."""
        x, past, key = seq.prefill_input()
        entry = self.prefix.lookup(key) if key else None
        seq.prefix = entry                         # released by _free_piece, even if the alloc fails
        if entry is not None:                      # a key comes only with past == 0: the entry is the start
            past = entry.num_tokens
            x = x[past:]
        n_new = x.shape[0]
        own = self._alloc(n_new)
        if entry is not None:
            self.reqs.write(seq.row, 0, entry.slots)
        seq.own_start = entry.num_tokens if entry is not None else 0
        seq.seq_len = past + n_new
        self.reqs.write(seq.row, past, own)
        insert = key if key and entry is None and self.prefix.enabled else None
        return x, n_new, seq.seq_len, insert

    def _new_generator(self, seed: int) -> Optional[torch.Generator]:
        """The exact sampler's per-request RNG (None for the batched sampler and greedy)."""
        if not self.sampler.per_request_rng:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def _alloc(self, n: int) -> torch.Tensor:
        if not self.pool.can_alloc(n):
            self.prefix.evict(n)
        return self.pool.alloc(n)

    def _decode(self, decoding: list, res: StepResult) -> None:
        need = len(decoding)
        if not self.pool.can_alloc(need):
            self.prefix.evict(need)
        while not self.pool.can_alloc(len(decoding)):
            # requests idling on text first (they make no progress), then the most recently
            # admitted decoding request; the last decoding one always keeps going
            idle = self._idle_holders()
            victims = idle or (decoding if len(decoding) > 1 else [])
            if not victims:
                break
            victim = max(victims, key=lambda s: s.order)
            if victim in decoding:
                decoding.remove(victim)
            self._pause(victim)
            res.paused += 1
        try:
            slots = self.pool.alloc(len(decoding))
            for seq in decoding:
                seq.seq_len += 1
            tokens = [s.next_token for s in decoding]
            rows = [s.row for s in decoding]
            lens = [s.seq_len for s in decoding]
            slot_list = slots.tolist()
            self.reqs.cpu[rows, np.asarray(lens) - 1] = slot_list   # the device table is written by the forward
            max_len = max(lens)
            rows_forced, drawn = self._sample_rows(decoding), None
            if self.graphs is not None and self.graphs.can_run(len(decoding), max_len):
                logits, drawn = self.graphs.run(tokens, rows, lens, slot_list, rows_forced[0])
            else:
                t = torch.tensor([tokens, rows, lens, slot_list], dtype=torch.int64).to(self.device)
                logits = self.runner.decode(t[0], t[1].to(torch.int32), t[2].to(torch.int32), t[3], max_len)
        except Exception as e:  # not attributable to one request: fail the batch, keep serving
            log.exception("decode failed")
            for seq in decoding:
                self._fail(seq, f"LLM decode step failed: {type(e).__name__}: {e}", res)
            return
        res.batch_size = len(decoding)
        self._sample(decoding, logits, res, rows_forced, drawn)

    def _sample_rows(self, batch: list) -> tuple[list, list]:
        """The sampler's row of every entry, and the token imposed at it (nothing is drawn for it, so
        the exact sampler's RNG does not advance) or None."""
        return [s.sample_row() for s in batch], [s.forced_token() for s in batch]

    def _sample(self, batch: list, logits: torch.Tensor, res: StepResult, rows_forced: Optional[tuple] = None,
                drawn: Optional[torch.Tensor] = None) -> None:
        """Draw (or take from `drawn`, the tokens the decode graph drew for every entry) and apply one
        token per entry."""
        rows, forced = rows_forced if rows_forced is not None else self._sample_rows(batch)
        try:
            if drawn is not None:
                tokens = drawn.tolist()
            else:
                tokens = [None] * len(batch)
                pick = [i for i, f in enumerate(forced) if f is None]
                if pick:
                    sampled = self.sampler.sample(logits[pick] if len(pick) < len(batch) else logits,
                                                  [rows[i] for i in pick])
                    for i, token in zip(pick, sampled):
                        tokens[i] = token
            tokens = [t if f is None else f for t, f in zip(tokens, forced)]
        except Exception as e:
            log.exception("sampling failed")
            for seq in batch:
                self._fail(seq, f"LLM sampling failed: {type(e).__name__}: {e}", res)
            return
        for seq, token in zip(batch, tokens):
            try:
                verdict = seq.accept(token)
            except LengthExceeded as e:
                self._fail(seq, str(e), res, status=413)
                continue
            if verdict == SPEAK:
                seq.next_token = token
                said = seq.passed_on(token)
                if said:                                # nothing to send for a dropped silent token
                    res.outputs.append(TokenOutput(seq.rid, said, seq.piece))
            elif verdict == WAIT:                       # holds its KV, out of the decode batch until its next input
                seq.next_token = None
            else:                                       # STOP: the token is not emitted; LAST: it is
                self._end_piece(seq, seq.passed_on(token) if verdict == LAST else [], res)

    # ---- bookkeeping --------------------------------------------------------------------------------

    def _idle_holders(self) -> list:
        """Requests holding KV while out of every forward (a bistream request waiting for text)."""
        return [s for s in self.running if s.seq_len > 0 and not s.decoding]

    def _free_piece(self, seq: Sequence) -> None:
        """Give back the piece's KV: own slots to the pool, the prefix reference to the cache."""
        if seq.seq_len > seq.own_start:
            self.pool.free(self.reqs.slots(seq.row, seq.own_start, seq.seq_len))
        seq.own_start = 0
        if seq.prefix is not None:
            self.prefix.release(seq.prefix)
            seq.prefix = None
        seq.seq_len = 0
        seq.next_token = None

    def _pause(self, seq: Sequence) -> None:
        held = seq.seq_len
        seq.on_pause()                 # before the KV goes: it may replay what it had fed
        self._free_piece(seq)
        self.num_paused += 1
        log.info("paused %s (KV pool full): %d KV tokens freed, prefilled again at a later step", seq.rid, held)

    def _drop(self, seq: Sequence) -> None:
        self._free_piece(seq)
        if seq.row is not None:
            self.reqs.free(seq.row)
            seq.row = None
        self.running.remove(seq)

    def _end_piece(self, seq: Sequence, tokens: list, res: StepResult) -> None:
        self._free_piece(seq)
        piece = seq.piece
        last = not seq.next_piece()    # the next piece is prefilled at the next prefill step
        res.outputs.append(TokenOutput(seq.rid, tokens, piece, True, last))
        if last:
            self._drop(seq)
            res.finished.append(seq)

    def _fail(self, seq: Sequence, message: str, res: StepResult, status: int = 500) -> None:
        if seq in self.running:
            self._drop(seq)
        res.errors.append((seq, message, status))
        res.outputs = [o for o in res.outputs if o.rid != seq.rid]   # nothing more goes out for it

    # ---- stats ---------------------------------------------------------------------------------------

    def kv_used(self) -> int:
        """Slots held by requests (their own and prefix entries they use)."""
        return self.pool.num_used - self.prefix.evictable_tokens()

    def stats(self) -> dict:
        cached = self.prefix.evictable_tokens()
        return dict(kv_used=self.pool.num_used - cached, kv_total=self.pool.size, kv_free=self.pool.num_free,
                    kv_cached=cached, kv_estimated_peak=self.estimated_peak() if self.running else 0,
                    prefix_hits=self.prefix.hits, prefix_misses=self.prefix.misses,
                    prefix_entries=len(self.prefix.entries), paused=self.num_paused,
                    cuda_graphs=len(self.graphs.graphs) if self.graphs is not None else 0,
                    sampler=self.sampler.mode, kv_int8=self.pool.int8)
