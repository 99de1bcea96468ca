"""The LLM stage's engine: router, token-slot KV pool, batched forward and sampling.

No sockets here (light_tts.server.llm.process owns them), so the engine is testable in-process.

Per request (LLMReq) and per text piece (sentence) it generates what `Qwen2LM.inference(piece,
prompt_text_ids, prompt_speech_tokens, seed=..., max_new_tokens=..., fixed_new_tokens=...)`
yields, as light_tts.synthesize calls it for each sentence (same length bounds and sampling
rules, the request's seed re-applied at the start of every piece); the pieces of one request run
one after another, requests run together. With the "exact" sampler (the CPU default) tokens are
identical to that call's; see light_tts.server.llm.sampler for the batched GPU sampler.

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
  far) at the next prefill step with room. Nothing is lost or sent twice.
A finished piece frees its slots at once; the next piece is prefilled at the next step. Abort and
errors free everything the request holds at once.

Bistream requests (LLMReq.bistream; text arrives later through add_text) follow
light_tts.models.bistream.BistreamPolicy, the same rules as Qwen2LM.inference_bistream: each input
the policy asks for (the prompt mix, 5 text tokens after a fill, the final text + task) is a
prefill that extends the request's KV; its speech tokens are decode steps like any other; after a
fill it waits for text holding its KV and row but out of every forward, so it never holds up the
batch. Admission reserves --bistream_max_len tokens for it (its length is unknown up front).
"""
from __future__ import annotations

import logging
import os
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from light_tts.models.bistream import SPEECH, BistreamPolicy
from light_tts.server.io_struct import LLMReq, SpeechTokensOutput
from light_tts.server.llm.mem_manager import KVPool
from light_tts.server.llm.model_runner import ModelRunner
from light_tts.server.llm.prefix_cache import PrefixCache, PrefixEntry
from light_tts.server.llm.req_manager import ReqManager
from light_tts.server.llm.router import Load, estimated_peak, expected_new_tokens
from light_tts.server.llm.sampler import Sampler, SampleRow

log = logging.getLogger("lighttts")

# Length bounds of a piece in speech tokens per text token: Qwen2LM.inference's defaults, which
# are the official CosyVoice2 inference values.
MIN_TOKEN_TEXT_RATIO = 2.0
MAX_TOKEN_TEXT_RATIO = 20.0
# (requests, tokens each) of the start-up prefill warm-up: single and packed batches, token counts
# on and off multiples of 16 (Triton specialises integer arguments on that).
WARM_PREFILL = ((1, 200), (2, 37), (4, 201), (16, 150))


class LengthExceeded(Exception):
    """A bistream request outgrew its length bound (answered 413)."""


@dataclass
class PiecePlan:
    text_ids: list
    input_len: int      # sos + prompt text + piece text + task id + prompt speech tokens
    min_len: int        # eos is masked before this many tokens
    max_len: int        # at most this many tokens (exactly this many with fixed_speech_tokens)


@dataclass(eq=False)
class Sequence:
    """One LLMReq inside the engine."""
    req: LLMReq
    plans: list
    seed: int
    order: int                                   # arrival number (admission / pause order)
    piece: int = 0
    decoded: list = field(default_factory=list)  # tokens of the current piece
    generator: Optional[torch.Generator] = None  # exact sampler: the piece's RNG
    row: Optional[int] = None                    # req_to_token row, from admission to the end
    own_start: int = 0                           # positions own_start..seq_len-1 own their slots
    prefix: Optional[PrefixEntry] = None         # shared prefix slots in use
    seq_len: int = 0                             # positions in the pool; 0 = the piece needs a prefill
    next_token: Optional[int] = None             # sampled, not yet fed
    paused: bool = False                         # KV dropped mid-piece; resume with decoded tokens
    prompt_text: list = field(default_factory=list)
    prompt_speech: list = field(default_factory=list)
    policy: Optional[BistreamPolicy] = None      # bistream requests only
    fed: list = field(default_factory=list)      # bistream: items in the KV (replayed after a pause)
    replay: list = field(default_factory=list)   # bistream: items to prefill again after a pause
    replay_ready: bool = False                   # ... ending in a token to draw after (paused mid-run)
    final_tokens: int = 0                        # bistream: tokens drawn after finish

    @property
    def rid(self) -> str:
        return self.req.rid

    @property
    def fixed(self) -> bool:
        return self.req.fixed_speech_tokens is not None

    @property
    def decoding(self) -> bool:
        """In the next decode step (a bistream request waiting for text holds KV but is not)."""
        return self.seq_len > 0 and (self.policy is None or self.next_token is not None)

    @property
    def needs_prefill(self) -> bool:
        if self.policy is not None:   # a request paused while waiting for text replays once text comes
            return (bool(self.replay) and self.replay_ready) or self.policy.has_input
        return self.seq_len == 0

    def prefill_len(self) -> int:
        if self.policy is not None:
            return len(self.replay) + (len(self.policy.lm_input) if self.policy.has_input else 0)
        return self.plans[self.piece].input_len + len(self.decoded)


@dataclass
class StepResult:
    outputs: list = field(default_factory=list)    # SpeechTokensOutput, at most one per request
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
        self.llm = llm                                  # light_tts.models.llm.Qwen2LM, eval mode
        self.device = llm.llm_embedding.weight.device
        cfg = llm.llm.model.model.config
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

        self.pool = KVPool(self.max_total_token_num, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                           llm.llm_embedding.weight.dtype, self.device, int8=int8_kv)
        self.reqs = ReqManager(self.running_max_req_size, self.max_req_total_len, self.pool.pad_slot, self.device)
        self.prefix = PrefixCache(self.pool, prefix_cache_entries)
        self.runner = ModelRunner(llm, self.pool, self.reqs)
        if sampler == "auto":
            sampler = os.environ.get("LIGHTTTS_SAMPLER") or ("batched" if self.device.type == "cuda" else "exact")
        self.sampler = Sampler(llm.speech_token_size, mode=sampler, greedy=greedy, **llm.sampling)
        self.graphs = None
        if cuda_graph and self.device.type == "cuda":
            from light_tts.server.llm.cuda_graph import try_capture
            self.graphs = try_capture(self.runner, graph_max_batch_size, min(graph_max_len_in_batch, self.max_req_total_len),
                                      None if self.sampler.per_request_rng else self.sampler)
        if self.device.type == "cuda":
            try:
                self.warm_up_prefill()
            except Exception as e:  # noqa: BLE001 - a speed-up only: serve without it
                log.warning("prefill warm-up failed, serving without it: %s: %s", type(e).__name__, e)

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
        hidden = self.llm.llm_embedding.weight.shape[1]
        dtype = self.llm.llm_embedding.weight.dtype
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

    def plan(self, req: LLMReq) -> list[PiecePlan]:
        """Length bounds per piece, as Qwen2LM.inference computes them."""
        prompt = 2 + len(req.prompt_text_ids) + len(req.prompt_speech_tokens)
        plans = []
        for piece in req.text_pieces:
            ids = [int(t) for t in piece]
            min_len, max_len = self.llm.length_bounds(len(ids), MIN_TOKEN_TEXT_RATIO, MAX_TOKEN_TEXT_RATIO)
            if req.fixed_speech_tokens is not None:
                min_len = max_len = int(req.fixed_speech_tokens)
            elif req.max_speech_tokens is not None:
                max_len = min(max_len, int(req.max_speech_tokens))
            plans.append(PiecePlan(ids, prompt + len(ids), min_len, max(0, max_len)))
        return plans

    def check(self, req: LLMReq) -> Optional[str]:
        """Why `req` can never run (the caller answers 400), or None."""
        if req.bistream:
            return self._check_bistream(req)
        if not req.text_pieces:
            return "no text to speak"
        return self._check_ids(req) or self._check_length(req)

    def _check_bistream(self, req: LLMReq) -> Optional[str]:
        if req.fixed_speech_tokens is not None:
            return "fixed_speech_tokens is not available for bistream requests (use max_speech_tokens)"
        bad = self._check_ids(req)
        if bad:
            return bad
        prompt = 2 + len(req.prompt_text_ids) + len(req.prompt_speech_tokens)
        if prompt + 16 > self.bistream_max_len:   # room for at least one 15-token run and its fill
            return (f"prompt too long for bistream: {prompt} tokens (prompt text {len(req.prompt_text_ids)} + prompt "
                    f"speech {len(req.prompt_speech_tokens)} + 2) leaves no room in --bistream_max_len "
                    f"{self.bistream_max_len}")
        return None

    def _check_ids(self, req: LLMReq) -> Optional[str]:
        vocab = self.llm.llm.model.model.config.vocab_size
        for name, ids, limit in (("text", [t for p in req.text_pieces for t in p], vocab),
                                 ("prompt text", _ids(req.prompt_text_ids), vocab),
                                 ("prompt speech", _ids(req.prompt_speech_tokens), self.llm.speech_token_size)):
            bad = [int(t) for t in ids if not 0 <= int(t) < limit]
            if bad:
                return f"{name} token id {bad[0]} out of range [0, {limit})"
        return None

    def _check_length(self, req: LLMReq) -> Optional[str]:
        plans = self.plan(req)
        worst = max(plans, key=lambda p: p.input_len + p.max_len)
        need = worst.input_len + worst.max_len
        if need > self.max_req_total_len:
            return (f"request too long: {need} tokens (prompt text {len(req.prompt_text_ids)} + text piece "
                    f"{len(worst.text_ids)} + prompt speech {len(req.prompt_speech_tokens)} + 2 special + up to "
                    f"{worst.max_len} speech tokens) exceeds --max_req_total_len {self.max_req_total_len}")
        return None

    def add(self, req: LLMReq) -> Sequence:
        seed = int(req.seed) if req.seed is not None else random.SystemRandom().randrange(2**63)
        # a bistream request is one open-ended piece; its length bound is --bistream_max_len
        plans = [PiecePlan([], 0, 0, self.bistream_max_len)] if req.bistream else self.plan(req)
        seq = Sequence(req=req, plans=plans, seed=seed, order=self._arrivals,
                       prompt_text=_ids(req.prompt_text_ids), prompt_speech=_ids(req.prompt_speech_tokens))
        if req.bistream:
            seq.policy = BistreamPolicy(seq.prompt_text, seq.prompt_speech, self.llm.speech_token_size,
                                        self.llm.mix_ratio)
            seq.generator = self._new_generator(seq.seed)   # one RNG for the whole utterance
        self._arrivals += 1
        self.waiting.append(seq)
        return seq

    def add_text(self, rid: str, tokens: list, finish: bool) -> bool:
        """More text (and/or its end) for bistream request `rid`; False if it is not here (ended)."""
        seq = self.find(rid)
        if seq is None or seq.policy is None:
            return False
        vocab = self.llm.llm.model.model.config.vocab_size
        seq.policy.add_text([int(t) for t in tokens if 0 <= int(t) < vocab])
        if finish:
            seq.policy.finish()
        return True

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

    def load(self, seq: Sequence, busy: bool) -> Load:
        """The request's KV load for the admission estimate (light_tts.server.llm.router)."""
        if seq.policy is not None:   # its length is unknown: reserve the bistream bound
            has = seq.seq_len + (seq.prefill_len() if seq.needs_prefill else 0)
            est = expected_new_tokens(self.bistream_max_len - has, 0, fixed=False, busy=busy,
                                      router_max_new_token_len=self.router_max_new_token_len)
            return Load(has=has, left=max(0, est))
        plan = seq.plans[seq.piece]
        produced = len(seq.decoded)
        est = expected_new_tokens(plan.max_len, produced, fixed=seq.fixed, busy=busy,
                                  router_max_new_token_len=self.router_max_new_token_len)
        has = seq.seq_len if seq.decoding else plan.input_len + produced
        later = [(p.input_len, expected_new_tokens(p.max_len, 0, fixed=seq.fixed, busy=busy,
                                                   router_max_new_token_len=self.router_max_new_token_len))
                 for p in seq.plans[seq.piece + 1:]]
        return Load(has=has, left=max(0, est - produced), later=max((i + e for i, e in later), default=0),
                    steps=sum(e for _, e in later))

    def estimated_peak(self, extra: tuple = ()) -> int:
        busy = self.is_busy()
        return estimated_peak([self.load(s, busy) for s in (*self.running, *extra)])

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
        for seq in [s for s in self.running if s.needs_prefill]:
            if seq.policy is None and seq.plans[seq.piece].max_len <= 0:
                continue                                   # ends without a forward (_skip_empty)
            need = seq.prefill_len()
            if need > budget or need > room:
                break                                      # keep the order: earlier requests first
            batch.append(seq)
            budget -= need
            room -= need
        if not admit or len(batch) < sum(1 for s in self.running if s.needs_prefill and
                                         (s.policy is not None or s.plans[s.piece].max_len > 0)):
            return batch                                   # admitted work is still waiting: admit nothing new
        busy = self.is_busy()
        loads = [self.load(s, busy) for s in self.running]
        while self.waiting and len(self.running) < self.running_max_req_size:
            seq = self.waiting[0]
            need = seq.prefill_len() if seq.needs_prefill else 0
            if need > budget or need > room:
                break
            loads.append(self.load(seq, busy))
            if estimated_peak(loads) > self.max_total_token_num:
                loads.pop()
                break
            self.waiting.popleft()
            seq.row = self.reqs.alloc()
            self.running.append(seq)
            res.admitted.append(seq)
            if need > 0 and seq.plans[0].max_len > 0:
                batch.append(seq)
                budget -= need
                room -= need
        return batch

    # ---- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> StepResult:
        res = StepResult()
        decoding = [s for s in self.running if s.decoding]
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
            decoding = [s for s in self.running if s.decoding]
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
            while (seq in self.running and seq.policy is None and not seq.decoding
                   and seq.plans[seq.piece].max_len <= 0):
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
        """Slots (in req_to_token) and input rows of a piece's prefill. Returns (x [n_new, D], n_new,
        total, the prefix key to insert after the forward or None)."""
        if seq.policy is not None:
            return self._place_bistream(seq)
        plan = seq.plans[seq.piece]
        if seq.paused:
            seq.paused = False                     # resume: prompt + the tokens so far, same sampler state
        else:
            seq.decoded = []
            seq.generator = self._new_generator(seq.seed)   # the seed re-applied per piece
        lm_input = self.llm.build_lm_input(plan.text_ids, seq.prompt_text, seq.prompt_speech)[0]
        if seq.decoded:
            fed = torch.tensor(seq.decoded, dtype=torch.long, device=self.device)
            lm_input = torch.cat((lm_input, self.llm.speech_embedding(fed)))
        total = lm_input.shape[0]
        key = tuple(seq.prompt_text)
        entry = self.prefix.lookup(key) if key else None
        seq.prefix = entry                         # released by _free_piece, even if the alloc fails
        past = entry.num_tokens if entry is not None else 0
        n_new = total - past
        own = self._alloc(n_new)
        if entry is not None:
            self.reqs.write(seq.row, 0, entry.slots)
        seq.own_start, seq.seq_len = past, total
        self.reqs.write(seq.row, past, own)
        insert = key if key and entry is None and self.prefix.enabled else None
        return lm_input[past:], n_new, total, insert

    def _place_bistream(self, seq: Sequence):
        """Extend the request's KV by the policy's next input (or, after a pause, everything again)."""
        items = seq.replay + (seq.policy.next_input() if seq.policy.has_input else [])
        seq.replay, seq.replay_ready, seq.paused = [], False, False
        past, n_new = seq.seq_len, len(items)
        if past + n_new > self.bistream_max_len:
            raise LengthExceeded(f"the utterance outgrew --bistream_max_len {self.bistream_max_len} tokens of "
                                 f"prompt, text and speech; send finish sooner or raise the limit")
        own = self._alloc(n_new)
        self.reqs.write(seq.row, past, own)
        seq.own_start, seq.seq_len = 0, past + n_new
        seq.fed += items
        return self.llm.embed_items(items), n_new, seq.seq_len, None

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
            # bistream requests idling on text first (they make no progress), then the most recently
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
                if seq.policy is not None:
                    seq.fed.append((SPEECH, seq.next_token))
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
        """The sampler's row of every entry, and the token a bistream policy forces at it (a scheduled
        fill: nothing is drawn for it, so the exact sampler's RNG does not advance) or None."""
        rows, forced = [], []
        for seq in batch:
            if seq.policy is not None:
                forced.append(seq.policy.forced_token())
                rows.append(SampleRow(decoded=seq.policy.out, ignore_eos=seq.policy.ignore_eos, block_stops=False,
                                      generator=seq.generator, seed=seq.seed, counter=len(seq.policy.out)))
            else:
                forced.append(None)
                plan = seq.plans[seq.piece]
                rows.append(SampleRow(decoded=seq.decoded, ignore_eos=len(seq.decoded) < plan.min_len,
                                      block_stops=seq.fixed, generator=seq.generator, seed=seq.seed,
                                      counter=(seq.piece << 24) | len(seq.decoded)))
        return rows, forced

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
            if seq.policy is not None:
                self._bistream_token(seq, token, res)
                continue
            plan = seq.plans[seq.piece]
            if token >= self.llm.speech_token_size:  # a stop token: not emitted
                self._end_piece(seq, [], res)
                continue
            seq.decoded.append(token)
            if len(seq.decoded) >= plan.max_len:
                self._end_piece(seq, [token], res)
            else:
                seq.next_token = token
                res.outputs.append(SpeechTokensOutput(rid=seq.rid, tokens=[token], piece=seq.piece))

    def _bistream_token(self, seq: Sequence, token: int, res: StepResult) -> None:
        final = seq.policy.final
        verdict = seq.policy.on_token(token)
        if verdict == "end":
            self._end_piece(seq, [], res)
        elif verdict == "speech":
            seq.policy.next_input()                          # this token is fed by the next decode step
            seq.final_tokens += final
            cap = self._final_cap(seq)
            if final and seq.final_tokens >= cap:
                self._end_piece(seq, [token], res)
            elif seq.seq_len + 1 > self.bistream_max_len:
                if final:
                    self._end_piece(seq, [token], res)
                else:
                    self._fail(seq, f"the utterance outgrew --bistream_max_len {self.bistream_max_len} tokens "
                                    f"before finish; send finish sooner or raise the limit", res, status=413)
            else:
                seq.next_token = token
                res.outputs.append(SpeechTokensOutput(rid=seq.rid, tokens=[token]))
        else:  # "wait": a fill; the KV stays, the request leaves the decode batch until its next input
            seq.next_token = None

    def _final_cap(self, seq: Sequence) -> int:
        """Tokens after finish: 20 x the utterance's text tokens (the unistream bound), max_speech_tokens."""
        cap = max(1, int(MAX_TOKEN_TEXT_RATIO * seq.policy.new_text_tokens))
        if seq.req.max_speech_tokens is not None:
            cap = min(cap, int(seq.req.max_speech_tokens))
        return cap

    # ---- bookkeeping --------------------------------------------------------------------------------

    def _idle_holders(self) -> list:
        """Bistream requests holding KV while out of every forward (waiting for text or a prefill)."""
        return [s for s in self.running if s.policy is not None and s.seq_len > 0 and not s.decoding]

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
        if seq.policy is not None:   # replay everything it had fed (and the token it was about to feed)
            seq.replay_ready = seq.decoding
            seq.replay = seq.fed + ([(SPEECH, seq.next_token)] if seq.decoding else [])
            seq.fed = []
        self._free_piece(seq)
        seq.paused = True
        self.num_paused += 1
        log.info("paused %s (KV pool full): %d tokens kept, resumed at a later prefill", seq.rid, len(seq.decoded))

    def _drop(self, seq: Sequence) -> None:
        self._free_piece(seq)
        if seq.row is not None:
            self.reqs.free(seq.row)
            seq.row = None
        self.running.remove(seq)

    def _end_piece(self, seq: Sequence, tokens: list, res: StepResult) -> None:
        self._free_piece(seq)
        last = seq.piece + 1 >= len(seq.plans)
        res.outputs.append(SpeechTokensOutput(rid=seq.rid, tokens=tokens, piece=seq.piece,
                                              piece_done=True, finished=last))
        if last:
            self._drop(seq)
            res.finished.append(seq)
        else:
            seq.piece += 1  # prefilled at the next prefill step
            seq.decoded = []
            seq.paused = False

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


def _ids(a) -> list:
    if a is None:
        return []
    return np.asarray(a).reshape(-1).astype(np.int64).tolist()
