"""The LLM stage's engine: admission, per-request generation state and one batched step.

No sockets here (light_tts.server.llm_process owns them), so the engine is testable in-process.

Per request (LLMReq) and per text piece (sentence) it generates exactly what
`Qwen2LM.inference(piece, prompt_text_ids, prompt_speech_tokens, seed=..., max_new_tokens=...,
fixed_new_tokens=...)` yields, as `light_tts.synthesize` calls it for each sentence (same length
bounds, same sampling, a generator re-seeded with the request's seed at the start of every
piece), while all running requests decode together:

    step():  one batched decode forward for every live row of the BatchKVCache (rows of
             different lengths, padded + masked), then a batch-1 prefill for every piece that
             starts now (its KV is copied into a new row), then per-request sampling.

This is the plain-PyTorch path; a later engine swaps the insides (token-slot KV pool, Triton
kernels, batched sampling) behind the same add / abort / admit / step interface.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from light_tts.models.qwen2 import BatchKVCache
from light_tts.server.io_struct import LLMReq, SpeechTokensOutput

# Length bounds of a piece in speech tokens per text token: Qwen2LM.inference's defaults, which
# are the official CosyVoice2 inference values.
MIN_TOKEN_TEXT_RATIO = 2.0
MAX_TOKEN_TEXT_RATIO = 20.0


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
    estimate: int                            # KV tokens reserved at admission (see LLMEngine.admit)
    piece: int = 0
    decoded: list = field(default_factory=list)   # tokens of the current piece (RAS window)
    generator: Optional[torch.Generator] = None
    row: Optional[int] = None                # BatchKVCache row while the piece is decoding
    next_token: Optional[int] = None         # sampled, not yet fed (the row's next decode input)

    @property
    def rid(self) -> str:
        return self.req.rid

    @property
    def fixed(self) -> bool:
        return self.req.fixed_speech_tokens is not None


@dataclass
class StepResult:
    outputs: list = field(default_factory=list)    # SpeechTokensOutput, at most one per request
    finished: list = field(default_factory=list)   # Sequences whose last piece ended this step
    errors: list = field(default_factory=list)     # (Sequence, message): dropped, answer 500
    batch_size: int = 0                            # rows in this step's batched decode forward
    prefills: int = 0


class LLMEngine:
    def __init__(self, llm, *, max_total_token_num: int, max_req_total_len: int,
                 running_max_req_size: int, router_max_new_token_len: int = 1024, greedy: bool = False):
        self.llm = llm                                  # light_tts.models.llm.Qwen2LM, eval mode
        self.body = llm.llm.model.model                 # Qwen2Model: takes positions / attention_mask
        self.device = llm.llm_embedding.weight.device
        self.max_total_token_num = max_total_token_num
        self.max_req_total_len = max_req_total_len
        self.running_max_req_size = running_max_req_size
        self.router_max_new_token_len = router_max_new_token_len
        self.greedy = greedy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.rows: list[Sequence] = []                  # rows[i] owns BatchKVCache row i
        self.cache = BatchKVCache(len(self.body.layers))

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
        if not req.text_pieces:
            return "no text to speak"
        plans = self.plan(req)
        worst = max(plans, key=lambda p: p.input_len + p.max_len)
        need = worst.input_len + worst.max_len
        if need > self.max_req_total_len:
            return (f"request too long: {need} tokens (prompt text {len(req.prompt_text_ids)} + text piece "
                    f"{len(worst.text_ids)} + prompt speech {len(req.prompt_speech_tokens)} + 2 special + up to "
                    f"{worst.max_len} speech tokens) exceeds --max_req_total_len {self.max_req_total_len}")
        return None

    def add(self, req: LLMReq) -> Sequence:
        plans = self.plan(req)
        # Admission estimate: the largest piece's prompt plus its expected speech tokens (exact with
        # fixed_speech_tokens, else its bound capped at --router_max_new_token_len; random and real
        # weights usually stop well before the bound).
        expected = [p.max_len if req.fixed_speech_tokens is not None
                    else min(p.max_len, self.router_max_new_token_len) for p in plans]
        estimate = max(p.input_len + e for p, e in zip(plans, expected))
        seed = int(req.seed) if req.seed is not None else random.SystemRandom().randrange(2**63)
        seq = Sequence(req=req, plans=plans, seed=seed, estimate=estimate)
        self.waiting.append(seq)
        return seq

    @torch.inference_mode()  # the cache holds inference tensors: freeing a row moves one in place
    def abort(self, rid: str) -> Optional[Sequence]:
        """Drop `rid` at once (its KV row too); returns it, or None when unknown."""
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
        return any(s.rid == rid for s in self.waiting) or any(s.rid == rid for s in self.running)

    # ---- scheduling ---------------------------------------------------------------------------

    def reserved_tokens(self) -> int:
        """KV tokens the running requests are assumed to need: each its admission estimate, or
        what it already holds if that is more."""
        held = {id(s): n for s, n in zip(self.rows, self.cache.lengths)}
        return sum(max(s.estimate, held.get(id(s), 0)) for s in self.running)

    def admit(self) -> list[Sequence]:
        """Move waiting requests (FIFO) into running while fewer than running_max_req_size run and
        the estimated tokens of running + new fit max_total_token_num. An idle engine always
        admits the head (check() guarantees it fits: max_req_total_len <= max_total_token_num)."""
        admitted = []
        used = self.reserved_tokens()
        while self.waiting and len(self.running) < self.running_max_req_size:
            seq = self.waiting[0]
            if self.running and used + seq.estimate > self.max_total_token_num:
                break
            self.waiting.popleft()
            self.running.append(seq)
            used += seq.estimate
            admitted.append(seq)
        return admitted

    # ---- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> StepResult:
        res = StepResult()
        logits: list[tuple[Sequence, torch.Tensor]] = []

        # 1. One batched decode forward for every live row (each fed its last sampled token).
        if self.rows:
            res.batch_size = len(self.rows)
            try:
                batch_logits = self._decode()
                logits.extend(zip(list(self.rows), batch_logits))
            except Exception as e:  # not attributable to one row: fail the batch, keep serving
                for seq in list(self.rows):
                    self._fail(seq, f"LLM decode step failed: {type(e).__name__}: {e}", res)
                self.cache = BatchKVCache(len(self.body.layers))

        # 2. Prefill every piece that starts now (batch 1, then copied into a new row).
        for seq in [s for s in self.running if s.row is None]:
            plan = seq.plans[seq.piece]
            if plan.max_len <= 0:  # nothing to generate (e.g. empty piece): the piece ends at once
                self._end_piece(seq, [], res)
                continue
            try:
                logits.append((seq, self._prefill(seq, plan)))
                res.prefills += 1
            except Exception as e:
                self._fail(seq, f"LLM prefill failed: {type(e).__name__}: {e}", res)

        # 3. Sample one token per request, emit it, end pieces.
        for seq, row_logits in logits:
            plan = seq.plans[seq.piece]
            try:
                token = self.llm.sample_token(row_logits, seq.decoded, ignore_eos=len(seq.decoded) < plan.min_len,
                                              greedy=self.greedy, block_all_stops=seq.fixed,
                                              generator=seq.generator)
            except Exception as e:
                self._fail(seq, f"LLM sampling failed: {type(e).__name__}: {e}", res)
                continue
            if token >= self.llm.speech_token_size:  # a stop token: not emitted
                self._end_piece(seq, [], res)
                continue
            seq.decoded.append(token)
            if len(seq.decoded) >= plan.max_len:
                self._end_piece(seq, [token], res)
            else:
                seq.next_token = token
                res.outputs.append(SpeechTokensOutput(rid=seq.rid, tokens=[token], piece=seq.piece))
        return res

    def _prefill(self, seq: Sequence, plan: PiecePlan) -> torch.Tensor:
        req = seq.req
        seq.decoded = []
        seq.generator = torch.Generator(device=self.device)
        seq.generator.manual_seed(seq.seed)
        lm_input = self.llm.build_lm_input(plan.text_ids, _ids(req.prompt_text_ids), _ids(req.prompt_speech_tokens))
        # Same cache capacity as Qwen2LM.inference, so prefill runs the very same kernels.
        kv = self.llm.new_cache(initial_capacity=lm_input.shape[1] + plan.max_len)
        out = self.llm.forward(lm_input, kv, last_only=True)[0]
        seq.row = self.cache.add_row(kv)
        self.rows.append(seq)
        return out

    def _decode(self) -> torch.Tensor:
        tokens = torch.tensor([s.next_token for s in self.rows], dtype=torch.long, device=self.device)
        x = self.llm.speech_embedding.weight[tokens].unsqueeze(1)          # (B, 1, D)
        positions, mask = self.cache.decode_layout()
        hidden = self.body(x, self.cache, positions=positions, attention_mask=mask)
        return self.llm.llm_decoder(hidden[:, -1])                        # (B, S + 3)

    # ---- bookkeeping --------------------------------------------------------------------------

    def _free_row(self, seq: Sequence) -> None:
        if seq.row is None:
            return
        moved = self.cache.remove_row(seq.row)
        last = self.rows.pop()
        if moved is not None:  # the last row now lives where seq's was
            self.rows[seq.row] = last
            last.row = seq.row
        seq.row = None
        seq.next_token = None

    def _drop(self, seq: Sequence) -> None:
        self._free_row(seq)
        self.running.remove(seq)

    def _end_piece(self, seq: Sequence, tokens: list, res: StepResult) -> None:
        self._free_row(seq)
        last = seq.piece + 1 >= len(seq.plans)
        res.outputs.append(SpeechTokensOutput(rid=seq.rid, tokens=tokens, piece=seq.piece,
                                              piece_done=True, finished=last))
        if last:
            self.running.remove(seq)
            res.finished.append(seq)
        else:
            seq.piece += 1  # prefilled at the next step
            seq.decoded = []

    def _fail(self, seq: Sequence, message: str, res: StepResult) -> None:
        if seq in self.running:
            self._drop(seq)
        res.errors.append((seq, message))
        # Nothing more goes out for it this step.
        res.outputs = [o for o in res.outputs if o.rid != seq.rid]

    # ---- stats --------------------------------------------------------------------------------

    def kv_tokens(self) -> int:
        return self.cache.tokens()


def _ids(a) -> list:
    if a is None:
        return []
    return np.asarray(a).reshape(-1).astype(np.int64).tolist()
