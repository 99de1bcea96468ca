"""Incremental normalisation and tokenisation of text that arrives in pieces (bistream synthesis).

A client (usually an LLM) sends text cut anywhere: "Hel" + "lo wor" + "ld, it costs 3" + ".5 dollars",
or "今天是2" + "024年10月" + "1日".  Normalising each piece on its own would read "3" and ".5" as two
numbers and give BPE half words, so `TextStream` holds back the tail that the next piece may still
change and releases the rest, as ids, at once:

* Whitespace ends a word.  Text is released up to the last whitespace-separated token, cut BEFORE
  the whitespace: released "Hello", held " world".  The whole token is held, not only its letters
  and digits, so "$3", "-3", "10:30", "1,000", "3." and "world?" stay in one piece.  normalize_text
  strips a part's leading space, but Qwen2 BPE keeps a word's space inside its token (" world"), so
  one space is put back when the raw part began with one, except next to CJK text, whose normaliser
  drops such blanks.  Cutting before a blank is always a BPE pre-token boundary, so English ids
  equal those of the whole text.
* wetext reads a number together with the tokens around it ("October 1, 2024", "$3 million",
  "5 kg", "3 pm"), so neighbouring tokens stay together while either holds a digit, and a finished
  word waits until the next token starts (it might be a number).  A lone mark ("-", "—") goes with
  the word after it.  A token ending a sentence (". ", "? ") is a safe boundary.
* CJK ideographs need no spaces and each one is complete, so a CJK token is cut inside.  Its last
  ideograph is held, with the non-CJK run right before it (digits go with their ideograph: "2024年"
  is read digit by digit, "2024" alone as a cardinal; a comma there joins the next clause, as
  "你好，" alone would end in "。") and all that follows it.  Holding that one ideograph keeps a
  closing mark with its sentence (the Chinese normaliser turns "." into "。").
* A part that normalises to nothing yields [].  One made only of punctuation yields [] before any
  speech (nothing to attach it to) and its ids after speech ("word ?" keeps its question mark).
* A held tail longer than `max_hold_chars` is released anyway (only its last token if that fits):
  memory and latency stay bounded.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from light_tts.frontend.text import is_only_punctuation

_SEGMENT = re.compile(r"\s*\S+")          # a token with the whitespace in front of it
_SENTENCE_END = tuple(".!?;。！？；…")
_CLOSERS = "\"')]}”’）】」』"


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


def _sticky(left: str, right: Optional[str]) -> bool:
    """Must two neighbouring tokens be normalised together?  (right is None: not started yet.)

    A sentence end is a safe boundary.  Otherwise a number is read with the words around it
    ("October 1, 2024", "$3 million", "5 kg", "3 pm"), and until the next token starts, it may
    be a number; a lone mark ("-", "—") goes with the word after it.
    """
    if left.rstrip(_CLOSERS).endswith(_SENTENCE_END):
        return False
    return right is None or any(ch.isdigit() for ch in left + right) or not any(ch.isalnum() for ch in left)


def _is_wide(ch: str) -> bool:
    """CJK ideographs and CJK / full-width punctuation: no blank is kept next to them."""
    return _is_cjk(ch) or "\u3000" <= ch <= "\u303f" or "\uff00" <= ch <= "\uffef"


def _cut(buf: str) -> tuple[int, int]:
    """Where the held tail of `buf` starts, and a shorter fallback that holds only the last token."""
    segs = [m.span() for m in _SEGMENT.finditer(buf)]
    if not segs:
        return 0, 0
    start, end = segs[-1]
    k = tok_start = end - len(buf[start:end].lstrip())
    for j in range(end - 1, tok_start - 1, -1):  # a CJK token: cut before its last ideograph's run
        if _is_cjk(buf[j]):
            k = j
            while k > tok_start and not _is_cjk(buf[k - 1]):
                k -= 1
            break
    if k > tok_start:
        return k, k
    i = len(segs) if end < len(buf) else len(segs) - 1  # index of the first held token
    plain = segs[i][0] if i < len(segs) else end
    while i > 0 and _sticky(buf[slice(*segs[i - 1])], buf[slice(*segs[i])] if i < len(segs) else None):
        i -= 1
    return (segs[i][0] if i < len(segs) else end), plain


class TextStream:
    """push(piece) -> ids safe to speak now; flush() -> the rest, ending the utterance."""

    def __init__(self, normalize: Callable[[str], str], tokenize: Callable[[str], list[int]],
                 max_hold_chars: int = 64):
        self._normalize = normalize
        self._tokenize = tokenize
        self.max_hold_chars = max_hold_chars
        self._buf = ""
        self._last: Optional[str] = None  # last character spoken in this utterance

    @property
    def held(self) -> str:
        return self._buf

    def push(self, piece: str) -> list[int]:
        self._buf += piece
        cut, plain = _cut(self._buf)
        if len(self._buf) - cut > self.max_hold_chars:
            cut = plain if len(self._buf) - plain <= self.max_hold_chars else len(self._buf)
        part, self._buf = self._buf[:cut], self._buf[cut:]
        return self._speak(part)

    def flush(self) -> list[int]:
        part, self._buf = self._buf, ""
        ids = self._speak(part)
        self._last = None
        return ids

    def _speak(self, part: str) -> list[int]:
        if not part or part.isspace():
            return []
        # the official normalisation (the English grammar only on text with a digit; a text wetext
        # rejects is retried with its whitespace folded)
        text = self._normalize(part)
        if not text or text.isspace() or (self._last is None and is_only_punctuation(text.replace(" ", ""))):
            return []
        if part[0].isspace() and self._last is not None and not text[0].isspace() \
                and not _is_wide(self._last) and not _is_wide(text[0]):
            text = " " + text
        self._last = text[-1]
        return self._tokenize(text)
