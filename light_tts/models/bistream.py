"""CosyVoice2's bistream policy: what the LM is fed, and when it waits, while text still streams in.

The official `Qwen2LM.inference_bistream` as a state machine, so that the plain reference loop
(`Qwen2LM.inference_bistream` here) and the batched engine (light_tts.server.llm.engine) share
one implementation of the rules. Items are ("sos" | "task" | "text" | "speech", id) pairs; the
caller embeds them (Qwen2LM.embed_items).

Rules (mix ratio 5 text : 15 speech, fill token = S + 2):
- the input starts as [sos]; the prompt transcript's tokens start the text queue;
- while prompt speech tokens remain and 5 text tokens are queued, 5 text + the next 15 prompt
  speech tokens are appended to the input;
- once the prompt speech is used up the LM speaks (eos masked). At the scheduled index (aligned so
  every 15 speech tokens, counting the prompt's, are followed by a fill) a fill token is forced;
  a drawn fill ends the run too. After a fill the next input is 5 queued text tokens; without 5,
  the request waits (it needs 5 before its very first run too when there is no prompt speech);
- after `finish`, once no run can start, the input (the last one fed, as the official loop leaves
  it, or what was never fed) + the queued text + task is fed and the LM speaks until eos.

Text arriving in any chunking gives the same input sequence: a run starts whenever 5 text tokens
are queued after a fill, which is the official loop fed 5 tokens per text chunk. Deviations,
because the official raises where a server must not: a drawn S + 1 in a run counts as a fill.
"""
from __future__ import annotations

from typing import Optional, Sequence

SOS, TASK, TEXT, SPEECH = "sos", "task", "text", "speech"


class BistreamPolicy:
    def __init__(self, prompt_text: Sequence[int], prompt_speech: Sequence[int], speech_token_size: int,
                 mix_ratio: Sequence[int] = (5, 15)):
        self.S = int(speech_token_size)
        self.fill = self.S + 2
        self.n_text, self.n_speech = int(mix_ratio[0]), int(mix_ratio[1])
        self.text = [int(t) for t in prompt_text]       # queued text tokens (the official text_cache)
        self.prompt_speech = [int(t) for t in prompt_speech]
        self.lm_input: list = [(SOS, 0)]                # the official lm_input
        self.lm_input_fed = False                       # lm_input is already in the KV (a stale copy)
        self.out: list[int] = []                        # tokens drawn so far, fills included
        p = len(self.prompt_speech)
        self.next_fill = (p // self.n_speech + 1) * self.n_speech - p
        self.running = False                            # a run is in progress (feed / draw tokens)
        self.finished_text = False                      # finish was received
        self.final = False                              # the final phase (after finish) has begun
        self.new_text_tokens = 0                        # text tokens added after the prompt

    # ---- events ---------------------------------------------------------------------------------

    def add_text(self, ids: Sequence[int]) -> None:
        ids = [int(t) for t in ids]
        self.text += ids
        self.new_text_tokens += len(ids)
        if ids:
            self._try_start()

    def finish(self) -> None:
        self.finished_text = True
        self._try_start()

    def next_input(self) -> Optional[list]:
        """Items to feed now (a forward follows), or None while waiting."""
        if not self.running or self.lm_input_fed:
            return None
        self.lm_input_fed = True
        return list(self.lm_input)

    @property
    def has_input(self) -> bool:
        """An input is ready to feed (next_input would return it)."""
        return self.running and not self.lm_input_fed

    def forced_token(self) -> Optional[int]:
        """The token the policy imposes at this draw (a scheduled fill), or None: sample."""
        if not self.final and len(self.out) == self.next_fill:
            return self.fill
        return None

    @property
    def ignore_eos(self) -> bool:
        return not self.final

    def on_token(self, token: int) -> str:
        """Record a drawn token. Returns "speech" (speak it; it is the next input), "wait" (a fill:
        the run ended) or "end" (the utterance is over)."""
        token = int(token)
        if self.final:
            if token >= self.S:
                self.running = False
                return "end"
            self.out.append(token)
            self.lm_input, self.lm_input_fed = [(SPEECH, token)], False
            return "speech"
        if token >= self.S:                            # fill, or S + 1 (the official raises on it)
            token = self.fill
            self.next_fill = len(self.out) + self.n_speech + 1
            self.out.append(token)
            self.running = False                        # lm_input stays: it is fed (stale)
            self._try_start()
            return "wait"
        self.out.append(token)
        self.lm_input, self.lm_input_fed = [(SPEECH, token)], False
        return "speech"

    @property
    def waiting(self) -> bool:
        """Neither running nor over: it needs text (or finish)."""
        return not self.running and not self.done

    @property
    def done(self) -> bool:
        return self.final and not self.running

    # ---- the official loop body ---------------------------------------------------------------

    def _try_start(self) -> None:
        if self.running or self.final:
            return
        while self.prompt_speech and len(self.text) >= self.n_text:
            self._append([(TEXT, t) for t in self.text[:self.n_text]] +
                         [(SPEECH, t) for t in self.prompt_speech[:self.n_speech]])
            self.text = self.text[self.n_text:]
            self.prompt_speech = self.prompt_speech[self.n_speech:]
        if not self.prompt_speech:
            after_fill = bool(self.out) and self.out[-1] == self.fill
            if after_fill or (not self.out and self.lm_input == [(SOS, 0)]):
                if len(self.text) >= self.n_text:
                    chunk = [(TEXT, t) for t in self.text[:self.n_text]]
                    self.text = self.text[self.n_text:]
                    if after_fill:
                        self.lm_input, self.lm_input_fed = chunk, False
                    else:
                        self._append(chunk)
                    self.running = True
                    return
            else:
                self.running = True
                return
        if self.finished_text:
            self._start_final()

    def _append(self, items: list) -> None:
        if self.lm_input_fed:          # cannot happen before the first run; kept for safety
            self.lm_input, self.lm_input_fed = [], False
        self.lm_input = self.lm_input + items

    def _start_final(self) -> None:
        # Official: concat([lm_input, text_cache, task_id]); lm_input may already be in the KV.
        self.lm_input = self.lm_input + [(TEXT, t) for t in self.text] + [(TASK, 0)]
        self.lm_input_fed = False
        self.text = []
        self.prompt_speech = []
        self.final = True
        self.running = True
