"""The two request kinds of the LLM engine, behind one interface.

The engine (light_tts.server.llm.engine) schedules and runs forwards; it never asks which kind a
request is. What differs between the kinds lives here:

    SentenceSequence   all text known up front (LLMReq.text_pieces): one generation per sentence
                       ("piece"), in turn, each what `Qwen2LM.inference(piece, ...)` yields (same
                       length bounds and sampling rules, the seed re-applied at every piece start);
                       every piece is a fresh KV sequence, its [sos, prompt text] from the prefix cache.
    BistreamSequence   text streamed in (LLMReq.bistream, add_text): one open-ended utterance fed by
                       light_tts.models.bistream.BistreamPolicy, the rules of Qwen2LM.inference_bistream.
                       Each input the policy asks for (the prompt mix, 5 text tokens after a fill, the
                       final text + task) is a prefill that extends the request's KV; after a fill it
                       waits for text holding its KV and row but out of every forward. Admission
                       reserves --bistream_max_len tokens for it (its length is unknown up front).

The interface (Sequence):
    needs_prefill / prefill_len() / prefill_input()   what to feed at the next prefill step
    empty                                             the current piece ends without a forward
    sample_row() / forced_token()                     how its next token is drawn
    accept(token) -> SPEAK | WAIT | STOP | LAST       what a drawn token does (LengthExceeded: 413)
    passed_on(token)                                  what of a spoken token goes out (silent-token rule)
    next_piece()                                      after a piece ends: is there another one
    on_pause()                                        its KV is about to be dropped (pool full)
    load(busy)                                        the router's admission estimate
    add_text(tokens, finish)                          streamed text (False: not a streaming kind)
    check(req, cfg)                                   why a request can never run, or None
The engine owns the KV fields (row, own_start, prefix, seq_len) and `next_token`: the sampled
token the next decode step feeds (None while the request is in no decode step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from light_tts.models.bistream import SPEECH
from light_tts.models.token2wav import SilenceFilter
from light_tts.server.io_struct import LLMReq
from light_tts.server.llm.router import Load, expected_new_tokens
from light_tts.server.llm.sampler import SampleRow

# Length bounds of a piece in speech tokens per text token: Qwen2LM.inference's defaults, which
# are the official CosyVoice2 inference values.
MIN_TOKEN_TEXT_RATIO = 2.0
MAX_TOKEN_TEXT_RATIO = 20.0

# accept()'s verdicts on a drawn token
SPEAK = 0   # emitted; the next decode step feeds it
WAIT = 1    # not emitted; the request holds its KV and waits for its next input (bistream fill)
STOP = 2    # a stop token: not emitted, the piece ends
LAST = 3    # emitted, and the piece ends with it (length bound)


class LengthExceeded(Exception):
    """A bistream request outgrew its length bound (answered 413)."""


@dataclass(frozen=True)
class SeqConfig:
    """What the kinds need from the engine: the model and the limits (one per engine)."""
    llm: object                      # light_tts.models.llm.Qwen2LM
    vocab_size: int                  # text token ids
    speech_token_size: int           # speech token ids; >= this is a stop / fill token
    max_req_total_len: int
    bistream_max_len: int
    router_max_new_token_len: int


@dataclass
class PiecePlan:
    text_ids: list
    input_len: int      # sos + prompt text + piece text + task id + prompt speech tokens
    min_len: int        # eos is masked before this many tokens
    max_len: int        # at most this many tokens (exactly this many with fixed_speech_tokens)


def sequence_kind(req: LLMReq) -> type:
    """The Sequence class that runs `req`."""
    return BistreamSequence if req.bistream else SentenceSequence


class Sequence:
    """One LLMReq inside the engine (base of the kinds; see the module doc for the interface)."""
    piece = 0          # the text piece outputs belong to
    empty = False      # the current piece ends without a forward

    def __init__(self, req: LLMReq, cfg: SeqConfig, seed: int, order: int,
                 generator: Optional[torch.Generator] = None):
        self.req = req
        self.cfg = cfg
        self.seed = seed
        self.order = order                       # arrival number (admission / pause order)
        self.generator = generator               # exact sampler: the request's RNG
        self.row: Optional[int] = None           # req_to_token row, from admission to the end
        self.own_start = 0                       # positions own_start..seq_len-1 own their slots
        self.prefix = None                       # PrefixEntry: shared prefix slots in use
        self.seq_len = 0                         # positions in the pool
        self.next_token: Optional[int] = None    # sampled, not yet fed
        self.prompt_text = _ids(req.prompt_text_ids)
        self.prompt_speech = _ids(req.prompt_speech_tokens)
        self.new_silence_filter()

    def new_silence_filter(self) -> None:
        """A fresh run count of the family's silent-token rule (per piece, as the official per call)."""
        self.silence = SilenceFilter(self.cfg.llm.SILENT_TOKENS, self.cfg.llm.MAX_SILENT_RUN)

    def passed_on(self, token: int) -> list:
        """What of a spoken token goes to the flow: [token], or [] where the silent-token rule drops it
        (the LM is fed it either way)."""
        return [token] if self.silence.passes(token) else []

    @property
    def rid(self) -> str:
        return self.req.rid

    @property
    def decoding(self) -> bool:
        """In the next decode step: holding KV and a token to feed. A sentence holds KV only while it
        has one; a bistream request also holds its KV while it waits for text after a fill."""
        return self.seq_len > 0 and self.next_token is not None

    def forced_token(self) -> Optional[int]:
        """The token imposed at this draw (nothing is drawn, the RNG does not advance), or None."""
        return None

    def next_piece(self) -> bool:
        """The current piece has ended (its KV freed): move to the next one; False if none is left."""
        return False

    def add_text(self, tokens: list, finish: bool) -> bool:
        return False

    @property
    def needs_prefill(self) -> bool:
        raise NotImplementedError

    def prefill_len(self) -> int:
        raise NotImplementedError

    def prefill_input(self) -> tuple:
        """The next prefill's input, consumed: (embeddings [n, D] of positions past..past+n-1, past,
        prefix-cache key of its leading positions or None; a key only with past == 0)."""
        raise NotImplementedError

    def sample_row(self) -> SampleRow:
        raise NotImplementedError

    def accept(self, token: int) -> int:
        """Record a drawn token; returns SPEAK, WAIT, STOP or LAST; raises LengthExceeded."""
        raise NotImplementedError

    def on_pause(self) -> None:
        raise NotImplementedError

    def load(self, busy: bool) -> Load:
        raise NotImplementedError


class SentenceSequence(Sequence):
    def __init__(self, req: LLMReq, cfg: SeqConfig, seed: int, order: int,
                 generator: Optional[torch.Generator] = None):
        super().__init__(req, cfg, seed, order, generator)
        self.plans = plan(req, cfg)
        self.piece = 0
        self.decoded: list = []                  # tokens of the current piece
        self.paused = False                      # KV dropped mid-piece; resume with decoded tokens
        self.fixed = req.fixed_speech_tokens is not None
        self.stop = cfg.speech_token_size
        self.prefix_key = tuple(self.prompt_text)

    @classmethod
    def check(cls, req: LLMReq, cfg: SeqConfig) -> Optional[str]:
        if not req.text_pieces:
            return "no text to speak"
        bad = check_ids(req, cfg) or check_text(req, cfg)
        if bad:
            return bad
        worst = max(plan(req, cfg), key=lambda p: p.input_len + p.max_len)
        need = worst.input_len + worst.max_len
        if need > cfg.max_req_total_len:
            return (f"request too long: {need} tokens (prompt text {len(req.prompt_text_ids)} + text piece "
                    f"{len(worst.text_ids)} + prompt speech {len(req.prompt_speech_tokens)} + 2 special + up to "
                    f"{worst.max_len} speech tokens) exceeds --max_req_total_len {cfg.max_req_total_len}")
        return None

    @property
    def empty(self) -> bool:
        return self.plans[self.piece].max_len <= 0

    @property
    def needs_prefill(self) -> bool:
        return self.seq_len == 0

    def prefill_len(self) -> int:
        return self.plans[self.piece].input_len + len(self.decoded)

    def prefill_input(self) -> tuple:
        plan_ = self.plans[self.piece]
        if self.paused:
            self.paused = False                  # resume: prompt + the tokens so far, same sampler state
        else:
            self.decoded = []
            if self.generator is not None:       # the seed re-applied per piece (a fresh generator's state)
                self.generator.manual_seed(self.seed)
        llm = self.cfg.llm
        x = llm.build_lm_input(plan_.text_ids, self.prompt_text, self.prompt_speech)[0]
        if self.decoded:
            fed = torch.tensor(self.decoded, dtype=torch.long, device=llm.device)
            x = torch.cat((x, llm.speech_embedding(fed)))
        return x, 0, self.prefix_key

    def sample_row(self) -> SampleRow:
        decoded = self.decoded
        return SampleRow(decoded=decoded, ignore_eos=len(decoded) < self.plans[self.piece].min_len,
                         block_stops=self.fixed, generator=self.generator, seed=self.seed,
                         counter=(self.piece << 24) | len(decoded))

    def accept(self, token: int) -> int:
        if token >= self.stop:
            return STOP
        self.decoded.append(token)
        return LAST if len(self.decoded) >= self.plans[self.piece].max_len else SPEAK

    def next_piece(self) -> bool:
        if self.piece + 1 >= len(self.plans):
            return False
        self.piece += 1                          # prefilled at the next prefill step
        self.decoded = []
        self.new_silence_filter()
        self.paused = False
        return True

    def on_pause(self) -> None:
        self.paused = True

    def load(self, busy: bool) -> Load:
        def expect(max_len: int, produced: int) -> int:
            return expected_new_tokens(max_len, produced, fixed=self.fixed, busy=busy,
                                       router_max_new_token_len=self.cfg.router_max_new_token_len)

        plan_ = self.plans[self.piece]
        produced = len(self.decoded)
        est = expect(plan_.max_len, produced)
        has = self.seq_len if self.decoding else plan_.input_len + produced
        later = [(p.input_len, expect(p.max_len, 0)) for p in self.plans[self.piece + 1:]]
        return Load(has=has, left=max(0, est - produced), later=max((i + e for i, e in later), default=0),
                    steps=sum(e for _, e in later))


class BistreamSequence(Sequence):
    def __init__(self, req: LLMReq, cfg: SeqConfig, seed: int, order: int,
                 generator: Optional[torch.Generator] = None):
        super().__init__(req, cfg, seed, order, generator)   # one RNG for the whole utterance
        self.max_len = cfg.bistream_max_len
        self.policy = cfg.llm.bistream_policy(self.prompt_text, self.prompt_speech)   # the family's rules
        self.fed: list = []          # items in the KV, and the sampled token about to be fed (replayed after a pause)
        self.replay: list = []       # items to prefill again after a pause
        self.replay_ready = False    # ... ending in a token to draw after (paused mid-run)
        self.final_tokens = 0        # tokens drawn after finish

    @classmethod
    def check(cls, req: LLMReq, cfg: SeqConfig) -> Optional[str]:
        if req.fixed_speech_tokens is not None:
            return "fixed_speech_tokens is not available for bistream requests (use max_speech_tokens)"
        bad = check_ids(req, cfg)
        if bad:
            return bad
        try:                                     # the family's bistream rules accept this prompt
            cfg.llm.bistream_policy(_ids(req.prompt_text_ids), _ids(req.prompt_speech_tokens))
        except ValueError as e:
            return str(e)
        prompt = 2 + len(req.prompt_text_ids) + len(req.prompt_speech_tokens)
        if prompt + 16 > cfg.bistream_max_len:   # room for at least one 15-token run and its fill
            return (f"prompt too long for bistream: {prompt} tokens (prompt text {len(req.prompt_text_ids)} + prompt "
                    f"speech {len(req.prompt_speech_tokens)} + 2) leaves no room in --bistream_max_len "
                    f"{cfg.bistream_max_len}")
        return None

    def add_text(self, tokens: list, finish: bool) -> bool:
        vocab = self.cfg.vocab_size
        self.policy.add_text([int(t) for t in tokens if 0 <= int(t) < vocab])
        if finish:
            self.policy.finish()
        return True

    @property
    def needs_prefill(self) -> bool:
        # a request paused while waiting for text replays once text comes
        return (bool(self.replay) and self.replay_ready) or self.policy.has_input

    def prefill_len(self) -> int:
        return len(self.replay) + (len(self.policy.lm_input) if self.policy.has_input else 0)

    def prefill_input(self) -> tuple:
        """Extend the KV by the policy's next input (after a pause, everything fed before it first)."""
        items = self.replay + (self.policy.next_input() if self.policy.has_input else [])
        self.replay, self.replay_ready = [], False
        past = self.seq_len
        if past + len(items) > self.max_len:
            raise LengthExceeded(f"the utterance outgrew --bistream_max_len {self.max_len} tokens of "
                                 f"prompt, text and speech; send finish sooner or raise the limit")
        self.fed += items
        return self.cfg.llm.embed_items(items), past, None

    def forced_token(self) -> Optional[int]:
        return self.policy.forced_token()

    def sample_row(self) -> SampleRow:
        out = self.policy.out
        return SampleRow(decoded=out, ignore_eos=self.policy.ignore_eos, block_stops=False,
                         generator=self.generator, seed=self.seed, counter=len(out))

    def accept(self, token: int) -> int:
        policy = self.policy
        final = policy.final
        verdict = policy.on_token(token)
        if verdict == "speech":
            policy.next_input()                  # this token is fed by the next decode step
            if final:
                self.final_tokens += 1
                if self.final_tokens >= self._final_cap():
                    return LAST
            if self.seq_len + 1 > self.max_len:
                if final:
                    return LAST
                raise LengthExceeded(f"the utterance outgrew --bistream_max_len {self.max_len} tokens before "
                                     f"finish; send finish sooner or raise the limit")
            self.fed.append((SPEECH, token))
            return SPEAK
        return STOP if verdict == "end" else WAIT   # "wait": a fill; the KV stays until the next input

    def _final_cap(self) -> int:
        """Tokens after finish: 20 x the utterance's text tokens (the unistream bound), max_speech_tokens."""
        cap = max(1, int(MAX_TOKEN_TEXT_RATIO * self.policy.new_text_tokens))
        if self.req.max_speech_tokens is not None:
            cap = min(cap, int(self.req.max_speech_tokens))
        return cap

    def on_pause(self) -> None:
        # replay everything fed (with the sampled token about to be fed: the last item of `fed`
        # exactly while decoding), then draw after it at once if it was decoding
        self.replay_ready = self.decoding
        self.replay, self.fed = self.fed, []

    def load(self, busy: bool) -> Load:
        # its length is unknown: reserve the bistream bound
        has = self.seq_len + (self.prefill_len() if self.needs_prefill else 0)
        est = expected_new_tokens(self.max_len - has, 0, fixed=False, busy=busy,
                                  router_max_new_token_len=self.cfg.router_max_new_token_len)
        return Load(has=has, left=max(0, est))


def plan(req: LLMReq, cfg: SeqConfig) -> list[PiecePlan]:
    """Length bounds per piece, as Qwen2LM.inference computes them."""
    prompt = 2 + len(req.prompt_text_ids) + len(req.prompt_speech_tokens)
    plans = []
    for piece in req.text_pieces:
        ids = [int(t) for t in piece]
        min_len, max_len = cfg.llm.length_bounds(len(ids), MIN_TOKEN_TEXT_RATIO, MAX_TOKEN_TEXT_RATIO)
        if req.fixed_speech_tokens is not None:
            min_len = max_len = int(req.fixed_speech_tokens)
        elif req.max_speech_tokens is not None:
            max_len = min(max_len, int(req.max_speech_tokens))
        plans.append(PiecePlan(ids, prompt + len(ids), min_len, max(0, max_len)))
    return plans


def check_ids(req: LLMReq, cfg: SeqConfig) -> Optional[str]:
    for name, ids, limit in (("text", [t for p in req.text_pieces for t in p], cfg.vocab_size),
                             ("prompt text", _ids(req.prompt_text_ids), cfg.vocab_size),
                             ("prompt speech", _ids(req.prompt_speech_tokens), cfg.speech_token_size)):
        bad = [int(t) for t in ids if not 0 <= int(t) < limit]
        if bad:
            return f"{name} token id {bad[0]} out of range [0, {limit})"
    return None


def check_text(req: LLMReq, cfg: SeqConfig) -> Optional[str]:
    """Why the model family cannot read a piece (CosyVoice3: no <|endofprompt|> in prompt text + piece), or None."""
    try:
        for piece in req.text_pieces:
            cfg.llm.check_text(piece, _ids(req.prompt_text_ids))
    except ValueError as e:
        return str(e)
    return None


def _ids(a) -> list:
    if a is None:
        return []
    return np.asarray(a).reshape(-1).astype(np.int64).tolist()
