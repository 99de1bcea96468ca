"""The speech-token LMs of CosyVoice2 and CosyVoice3: a Qwen2 body between speech-token
embeddings and a speech head. Both families share the body, the inference loops and the sampling
rules; they differ only in where the special tokens live (`Qwen2LM` / `CosyVoice3LM` below).

CosyVoice2: state-dict keys equal the official `cosyvoice.llm.llm.Qwen2LM` (with its Qwen2Encoder):

    llm_embedding.weight          (2, D)       row 0 = sos, row 1 = task id
    llm.model.model.*             Qwen2 body (text embeddings, layers, final norm)
    llm.model.lm_head.weight      text head; unused here, tied to embed_tokens
    llm_decoder.{weight,bias}     (S + 3, D)   speech head: S speech tokens, eos, 2 specials
    speech_embedding.weight       (S + 3, D)

CosyVoice3: the official `CosyVoice3LM` keys: no llm_embedding; the special tokens are speech ids
    speech_embedding.weight       (S + 200, D)  rows S.. S + 3 = sos, eos, task id, fill
    llm_decoder.weight            (S + 200, D)  no bias

Inference input (unistream, as the official `inference`):
    [sos, embed_tokens(prompt_text + text), task_id, speech_embedding(prompt_speech)]
then autoregressive speech tokens until one >= S is drawn (every id >= S is in the official
`stop_token_ids`: S..S+2 for CosyVoice2, S..S+199 for CosyVoice3), with min/max length from
token/text ratios.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from light_tts.models.bistream import SOS, SPEECH, TASK, TEXT, BistreamPolicy
from light_tts.models.config import ENDOFPROMPT_ID, Qwen2Config
from light_tts.models.qwen2 import KVCache, Qwen2ForCausalLM
from light_tts.models.sampling import greedy_sampling, ras_sampling

TokenIds = Union[torch.Tensor, Sequence[int]]

# Official ras_sampling defaults (cosyvoice2.yaml `sampling`).
DEFAULT_SAMPLING = {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}


class Qwen2Encoder(nn.Module):
    """Holds the Qwen2 model under `.model` (official key prefix `llm.model.`)."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.model = Qwen2ForCausalLM(cfg)

    def forward(self, xs: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """xs: (B, T, D) input embeddings -> final-norm hidden states (B, T, D)."""
        return self.model.model(xs, cache)


def _as_ids(ids: Optional[TokenIds], device: torch.device) -> torch.Tensor:
    """Token ids as a 1-D long tensor; accepts (T,), (1, T), lists and None (empty)."""
    if ids is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    t = torch.as_tensor(ids, dtype=torch.long).to(device)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise ValueError(f"expected one sequence of token ids, got shape {tuple(t.shape)}")
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"expected token ids of shape (T,) or (1, T), got {tuple(t.shape)}")
    return t


class Qwen2LM(nn.Module):
    NUM_EXTRA_TOKENS = 3       # speech-head ids past the S speech tokens; every one is a stop token
    # Speech tokens of which the official CosyVoice3Model.llm_job passes at most MAX_SILENT_RUN in a
    # row on to the flow (the LM itself still sees them all); none for CosyVoice2.
    SILENT_TOKENS: tuple = ()
    MAX_SILENT_RUN = 5

    def __init__(self, llm_input_size: int, llm_output_size: int, speech_token_size: int,
                 qwen2: Qwen2Config, mix_ratio: Sequence[int] = (5, 15),
                 sampling: Optional[dict] = None, **training_only_kwargs_ignored):
        # Ignored: length_normalized_loss, lsm_weight (training loss), `llm` (the yaml's nested
        # encoder object: we build the body from `qwen2` instead).
        super().__init__()
        self.llm_input_size = int(llm_input_size)
        self.llm_output_size = int(llm_output_size)
        self.speech_token_size = int(speech_token_size)
        if self.llm_input_size != qwen2.hidden_size or self.llm_output_size != qwen2.hidden_size:
            raise ValueError(f"llm_input_size/llm_output_size ({self.llm_input_size}/{self.llm_output_size}) "
                             f"must equal the Qwen2 hidden_size {qwen2.hidden_size}")
        self.mix_ratio = [int(r) for r in mix_ratio]
        # ras_sampling kwargs; yaml values may arrive as strings, so coerce to the default's type.
        given = {**DEFAULT_SAMPLING, **{k: v for k, v in (sampling or {}).items() if k in DEFAULT_SAMPLING}}
        self.sampling = {k: type(DEFAULT_SAMPLING[k])(float(v)) for k, v in given.items()}
        self._build_modules(qwen2)

    @classmethod
    def from_config(cls, cfg) -> "Qwen2LM":
        """Built from a family's light_tts.models.config.ModelConfig (its llm, qwen2 and sampling)."""
        return cls(**cfg.llm, qwen2=cfg.qwen2, sampling=cfg.sampling)

    def _build_modules(self, qwen2: Qwen2Config) -> None:
        """CosyVoice2: sos and task id are the two rows of `llm_embedding`; the speech head has
        S + 3 outputs (eos = S, fill = S + 2) and a bias. Registration order matches the official
        module so state_dict() lists keys in the same order."""
        S, extra = self.speech_token_size, self.NUM_EXTRA_TOKENS
        self.sos, self.task_id = 0, 1                   # rows of llm_embedding
        self.eos_token, self.fill_token = S, S + 2      # speech-head ids
        self.llm_embedding = nn.Embedding(2, self.llm_input_size)
        self.llm = Qwen2Encoder(qwen2)
        self.llm_decoder = nn.Linear(self.llm_output_size, S + extra)
        self.speech_embedding = nn.Embedding(S + extra, self.llm_input_size)

    @property
    def special_embedding(self) -> nn.Embedding:
        """The table holding the sos and task-id rows (indexed by self.sos / self.task_id)."""
        return self.llm_embedding

    @property
    def stop_token_ids(self) -> range:
        """Every id that ends generation when drawn (the official `stop_token_ids`): all ids >= S."""
        return range(self.speech_token_size, self.speech_token_size + self.NUM_EXTRA_TOKENS)

    @property
    def device(self) -> torch.device:
        return self.speech_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.speech_embedding.weight.dtype

    # ---- model pieces -------------------------------------------------------------------

    def new_cache(self, initial_capacity: int = 256) -> KVCache:
        return self.llm.model.model.new_cache(initial_capacity)

    def forward(self, lm_input: torch.Tensor, cache: Optional[KVCache] = None,
                last_only: bool = False) -> torch.Tensor:
        """lm_input: (B, T, D) embeddings following what `cache` holds (prefill: all of the
        prompt; decode: one token). Returns speech-head logits (B, T, V), or (B, V) for the
        last position only with `last_only` (what generation needs); V = S + 3 (CosyVoice2) or
        S + 200 (CosyVoice3)."""
        hidden = self.llm(lm_input, cache)
        if last_only:
            hidden = hidden[:, -1]
        return self.llm_decoder(hidden)

    def build_lm_input(self, text_ids: TokenIds, prompt_text_ids: Optional[TokenIds] = None,
                       prompt_speech_tokens: Optional[TokenIds] = None) -> torch.Tensor:
        """[sos, embed(prompt_text + text), task_id, speech_embed(prompt_speech)] as (1, L, D)."""
        device = self.device
        text = torch.cat((_as_ids(prompt_text_ids, device), _as_ids(text_ids, device)))
        speech = _as_ids(prompt_speech_tokens, device)
        special = self.special_embedding.weight
        parts = [special[self.sos:self.sos + 1],
                 self.llm.model.model.embed_tokens(text),
                 special[self.task_id:self.task_id + 1],
                 self.speech_embedding(speech)]
        return torch.cat(parts, dim=0).unsqueeze(0)

    def embed_items(self, items: Sequence[tuple]) -> torch.Tensor:
        """Bistream input items [(kind, id)] (light_tts.models.bistream) -> (L, D) embeddings."""
        device = self.device
        tables = {SOS: self.special_embedding, TASK: self.special_embedding,
                  TEXT: self.llm.model.model.embed_tokens, SPEECH: self.speech_embedding}
        fixed = {SOS: self.sos, TASK: self.task_id}
        parts, i = [], 0
        while i < len(items):  # one lookup per run of same-kind items
            kind, j = items[i][0], i
            while j < len(items) and items[j][0] == kind:
                j += 1
            ids = [fixed.get(kind, t) for _, t in items[i:j]]
            parts.append(tables[kind](torch.tensor(ids, dtype=torch.long, device=device)))
            i = j
        return torch.cat(parts, dim=0)

    def check_text(self, text: TokenIds, prompt_text: Optional[TokenIds] = None) -> None:
        """Refuse input the family cannot read (CosyVoice2 reads any text)."""

    def bistream_policy(self, prompt_text: Sequence[int], prompt_speech: Sequence[int]) -> BistreamPolicy:
        """The bistream rules of this family (light_tts.models.bistream) for one request."""
        return BistreamPolicy(prompt_text, prompt_speech, self.speech_token_size, self.mix_ratio)

    # ---- generation ---------------------------------------------------------------------

    def sample_token(self, logits: torch.Tensor, decoded: Sequence[int], *, ignore_eos: bool,
                     greedy: bool = False, block_all_stops: bool = False,
                     generator: Optional[torch.Generator] = None) -> int:
        """Pick the next token from last-position logits (V,).

        Scores are log-softmax in fp32 (the official takes log_softmax in the model dtype;
        in fp32 this is the same). `ignore_eos` masks the one id the official `sampling_ids`
        masks, id S: CosyVoice2's eos (S + 1 / S + 2 may still be drawn and end the sequence);
        in CosyVoice3 id S is sos, so there every stop id, eos (S + 1) included, stays drawable
        during min_len, exactly as the official (non-vLLM) loop. `block_all_stops` masks every
        non-speech token (fixed-length runs)."""
        scores = logits.float().log_softmax(dim=-1)
        if block_all_stops:
            scores[self.speech_token_size:] = -float("inf")
        elif ignore_eos:
            scores[self.speech_token_size] = -float("inf")
        if greedy:
            return greedy_sampling(scores)
        return ras_sampling(scores, decoded, generator=generator, **self.sampling)

    def length_bounds(self, num_text_tokens: int, min_token_text_ratio: float,
                      max_token_text_ratio: float) -> tuple[int, int]:
        """(min_len, max_len) in speech tokens from the tts-text length (prompt text excluded)."""
        return int(num_text_tokens * min_token_text_ratio), int(num_text_tokens * max_token_text_ratio)

    @torch.inference_mode()
    def inference(self, text: TokenIds, prompt_text: Optional[TokenIds] = None,
                  prompt_speech_token: Optional[TokenIds] = None, *,
                  min_token_text_ratio: float = 2, max_token_text_ratio: float = 20,
                  greedy: bool = False, seed: Optional[int] = None,
                  max_new_tokens: Optional[int] = None,
                  fixed_new_tokens: Optional[int] = None) -> Iterator[int]:
        """Yield speech token ids one by one (stream as they come).

        Stops when a token >= speech_token_size is drawn (not yielded), or after max_len
        tokens; eos is masked for the first min_len steps. `max_new_tokens` further caps
        max_len. `fixed_new_tokens=N` ignores every stop token and yields exactly N tokens
        (benchmarks with random weights, which rarely emit eos). `seed` gives this call its
        own RNG; without it the global torch RNG is used, as the official code does.
        `greedy` is argmax (no official counterpart; for tests and references).
        """
        device = self.device
        self.check_text(text, prompt_text)
        num_text = int(_as_ids(text, device).numel())
        min_len, max_len = self.length_bounds(num_text, min_token_text_ratio, max_token_text_ratio)
        if fixed_new_tokens is not None:
            min_len = max_len = int(fixed_new_tokens)
        elif max_new_tokens is not None:
            max_len = min(max_len, int(max_new_tokens))
        if max_len <= 0:
            return

        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))

        lm_input = self.build_lm_input(text, prompt_text, prompt_speech_token)
        cache = self.new_cache(initial_capacity=lm_input.shape[1] + max_len)
        decoded: list[int] = []
        for step in range(max_len):
            logits = self.forward(lm_input, cache, last_only=True)[0]
            token = self.sample_token(logits, decoded, ignore_eos=step < min_len, greedy=greedy,
                                      block_all_stops=fixed_new_tokens is not None, generator=generator)
            if token >= self.speech_token_size:
                break
            yield token
            decoded.append(token)
            lm_input = self.speech_embedding.weight[token].view(1, 1, -1)

    @torch.inference_mode()
    def inference_bistream(self, text_chunks: Iterable[TokenIds], prompt_text: Optional[TokenIds] = None,
                           prompt_speech_token: Optional[TokenIds] = None, *, greedy: bool = False,
                           seed: Optional[int] = None, max_final_tokens: Optional[int] = None) -> Iterator[int]:
        """Yield speech tokens while text arrives as `text_chunks` (token ids per chunk): the
        official `inference_bistream` (rules: light_tts.models.bistream). Text is pulled only
        when the LM waits for it, as the official loop does. `max_final_tokens` caps the tokens
        after the text ends (the official has no cap)."""
        device = self.device
        policy = self.bistream_policy(_as_ids(prompt_text, device).tolist(),
                                      _as_ids(prompt_speech_token, device).tolist())
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
        cache = self.new_cache()
        chunks = iter(text_chunks)
        final_tokens = 0
        while not policy.done:
            items = policy.next_input()
            if items is None:
                chunk = next(chunks, None)
                if chunk is None:
                    policy.finish()
                else:
                    policy.add_text(_as_ids(chunk, device).tolist())
                continue
            if policy.final and max_final_tokens is not None and final_tokens >= max_final_tokens:
                return
            logits = self.forward(self.embed_items(items).unsqueeze(0), cache, last_only=True)[0]
            token = policy.forced_token()
            if token is None:
                token = self.sample_token(logits, policy.out, ignore_eos=policy.ignore_eos, greedy=greedy,
                                          generator=generator)
            final_tokens += policy.final
            if policy.on_token(token) == "speech":
                yield token


class CosyVoice3BistreamPolicy(BistreamPolicy):
    """CosyVoice3's bistream rules: CosyVoice2's, with two differences taken from the official
    `inference_bistream` run by a CosyVoice3LM: the fill token is S + 3, and the prompt text up to
    and including `<|endofprompt|>` (the instruction) follows sos in the first input, so only the
    transcript after it joins the text queue. The first input is then longer than [sos], so with no
    prompt speech the LM speaks from [sos, instruction] at once (the official condition for waiting
    for 5 text tokens is an input of length 1)."""

    def __init__(self, prompt_text: Sequence[int], prompt_speech: Sequence[int], speech_token_size: int,
                 mix_ratio: Sequence[int], fill_token: int, endofprompt_id: int):
        prompt_text = [int(t) for t in prompt_text]
        if endofprompt_id not in prompt_text:
            raise ValueError(f"CosyVoice3 bistream needs <|endofprompt|> (id {endofprompt_id}) in the prompt text")
        cut = prompt_text.index(endofprompt_id) + 1
        super().__init__(prompt_text[cut:], prompt_speech, speech_token_size, mix_ratio)
        self.fill = int(fill_token)
        self.lm_input = self.lm_input + [(TEXT, t) for t in prompt_text[:cut]]


class CosyVoice3LM(Qwen2LM):
    """CosyVoice3's speech LM (official `cosyvoice.llm.llm.CosyVoice3LM`): the Qwen2LM body and loops;
    the special tokens are speech ids with rows in `speech_embedding`:
    sos = S, eos = S + 1, task id = S + 2, fill = S + 3; the speech vocabulary and the bias-free head
    have S + 200 entries, and every id >= S is a stop token. The official asserts that the text (prompt
    text + text) holds `<|endofprompt|>`; so do `inference` and `inference_bistream` here
    (`endofprompt_id`: the official hard-coded 151646 unless the loader passes the directory's own)."""

    NUM_EXTRA_TOKENS = 200
    SILENT_TOKENS = (1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323)  # official CosyVoice3Model

    def __init__(self, llm_input_size: int, llm_output_size: int, speech_token_size: int,
                 qwen2: Qwen2Config, mix_ratio: Sequence[int] = (5, 15),
                 sampling: Optional[dict] = None, endofprompt_id: int = ENDOFPROMPT_ID,
                 **training_only_kwargs_ignored):
        super().__init__(llm_input_size, llm_output_size, speech_token_size, qwen2, mix_ratio=mix_ratio,
                         sampling=sampling)
        self.endofprompt_id = int(endofprompt_id)

    @classmethod
    def from_config(cls, cfg) -> "CosyVoice3LM":
        return cls(**cfg.llm, qwen2=cfg.qwen2, sampling=cfg.sampling, endofprompt_id=cfg.endofprompt_id)

    def _build_modules(self, qwen2: Qwen2Config) -> None:
        # Registration order of the official module: llm, llm_decoder, speech_embedding.
        S, extra = self.speech_token_size, self.NUM_EXTRA_TOKENS
        self.sos, self.eos_token, self.task_id, self.fill_token = S, S + 1, S + 2, S + 3
        self.llm = Qwen2Encoder(qwen2)
        self.llm_decoder = nn.Linear(self.llm_output_size, S + extra, bias=False)
        self.speech_embedding = nn.Embedding(S + extra, self.llm_input_size)

    @property
    def special_embedding(self) -> nn.Embedding:
        return self.speech_embedding

    def check_text(self, text: TokenIds, prompt_text: Optional[TokenIds] = None) -> None:
        device = self.device
        ids = torch.cat((_as_ids(prompt_text, device), _as_ids(text, device)))
        if not bool((ids == self.endofprompt_id).any()):
            raise ValueError(f"CosyVoice3 needs <|endofprompt|> (id {self.endofprompt_id}) in the prompt text "
                             "or the text: the official frontend's prompts end their instruction with it")

    def bistream_policy(self, prompt_text: Sequence[int], prompt_speech: Sequence[int]) -> BistreamPolicy:
        return CosyVoice3BistreamPolicy(prompt_text, prompt_speech, self.speech_token_size, self.mix_ratio,
                                        self.fill_token, self.endofprompt_id)
