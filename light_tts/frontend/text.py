"""Text normalisation and sentence splitting for CosyVoice2.

Behaviour follows the official `CosyVoiceFrontEnd.text_normalize` when the
`ttsfrd` engine is absent (its usual deployment): `wetext` FST normalisation,
a few character clean-ups, and a punctuation-driven splitter that packs
sentences into pieces of bounded length for the LLM.

Pipeline for one input string (stripped first):

    markup '<|...|>' present  ->  returned untouched (instruct / SSML-like tags)
    contains a CJK ideograph  ->  Chinese path:
        wetext (zh) if it holds a digit -> drop newlines -> drop blanks not
        between two ASCII chars -> ²/³ spelled out -> '.' becomes '。'
        -> ' - ' becomes '，' -> strip brackets -> trailing commas become '。'
        -> split by characters
    otherwise                 ->  English path:
        wetext (en) if it holds a digit -> leftover digit runs spelled out by
        `inflect` -> split, lengths measured with the text tokenizer
        (whitespace inside is kept as it is: "a.\\n\\nb  c" stays so)
    pieces made only of punctuation/symbols are dropped.

The official code pins wetext 0.0.4; we run on wetext 0.1.x (0.0.4 downloads
its grammars from modelscope at run time; 0.1.x ships them). With the same
grammars the two agree on text holding a digit; where 0.1.x differs we keep
the pinned behaviour (tests/test_text_official.py compares with recorded
official outputs):
  * wetext 0.0.4 runs a grammar only on text holding a digit, English as
    Chinese; 0.1.x runs the English one on all text ("Mr. Brown & Mrs. Green"
    -> "Mister Brown and Misses Green").  We call wetext only when the text
    holds a digit.
  * The language handed to wetext is the branch we are in (zh / en). The
    official code builds its normalisers with lang="auto"; in 0.0.4 "auto"
    meant exactly our contains-Chinese test, but 0.1.x also routes all-digit
    strings ("2024") to the Chinese grammar. We keep the pinned behaviour
    ("twenty twenty four").
  * wetext 0.1.x escapes '"' and '\\' a second time when it re-serialises
    tokens, so normalised text comes back with '\\"'.  We undo that escaping
    (wetext 0.0.4 returned plain quotes).
Inputs the official code crashes on give a well-defined result here:
whitespace only ([]), a closing quote right after a leading stop mark, and
English with a digit and a whitespace run wetext's token parser asserts on
("1.\\n\\nNext", "at  3": read with the whitespace folded to single blanks).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from functools import lru_cache
from typing import Callable, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "normalize_text",
    "split_paragraph",
    "is_only_punctuation",
    "contains_chinese",
    "replace_blank",
    "replace_corner_mark",
    "remove_bracket",
    "spell_out_number",
]

_CJK_IDEOGRAPH = re.compile(r"[\u4e00-\u9fff]")

# Sentence-final marks used to cut a paragraph. The Chinese list also accepts
# ASCII marks because mixed zh/en text keeps them; '、' (enumeration comma) is
# a cut point in the official splitter, so it is one here as well.
_ZH_STOPS = ("。", "？", "！", "；", "：", "、", ".", "?", "!", ";")
_EN_STOPS = (".", "?", "!", ";", ":")
_COMMAS = ("，", ",")
# A closing quote right after a stop mark belongs to the sentence it closes.
_CLOSING_QUOTES = ('"', "”")

# Tokens for the English length estimate when no tokenizer is given.
_ROUGH_TOKEN = re.compile(r"\w+|[^\w\s]")


def contains_chinese(text: str) -> bool:
    """True if `text` has at least one CJK unified ideograph (U+4E00..U+9FFF)."""
    return _CJK_IDEOGRAPH.search(text) is not None


def replace_corner_mark(text: str) -> str:
    """Spell superscript squares/cubes the way a Chinese reader says them (m² -> m平方)."""
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    """Drop full-width brackets and backticks; an em-dash pair becomes a pause (space)."""
    for mark in ("（", "）", "【", "】", "`"):
        text = text.replace(mark, "")
    return text.replace("——", " ")


def replace_blank(text: str) -> str:
    """Remove spaces except those separating two ASCII words (Chinese needs no spaces).

    A space survives only when both neighbours are ASCII and not themselves a
    space: "你好 world" -> "你好world", "hello  world" -> "helloworld",
    "hello world" stays.
    """

    def is_ascii_word_char(ch: Optional[str]) -> bool:
        return ch is not None and ch.isascii() and ch != " "

    kept = []
    last = len(text) - 1
    for i, ch in enumerate(text):
        if ch != " ":
            kept.append(ch)
            continue
        before = text[i - 1] if i > 0 else None
        after = text[i + 1] if i < last else None
        if is_ascii_word_char(before) and is_ascii_word_char(after):
            kept.append(ch)
    return "".join(kept)


@lru_cache(maxsize=1)
def _inflect_engine():
    import inflect

    return inflect.engine()


def spell_out_number(text: str, engine=None) -> str:
    """Replace every run of digit characters by its English words ("23" -> "twenty-three").

    Runs are maximal sequences of `str.isdigit()` characters, so "4.50" becomes
    "four.fifty" (wetext normally handles decimals before this step).
    """
    if not any(ch.isdigit() for ch in text):
        # wetext has usually spelled every number already; skipping here also
        # avoids importing inflect, whose import costs seconds (typeguard
        # re-instruments its methods at import time).
        return text
    engine = engine or _inflect_engine()
    # str.isdigit() is wider than the regex `\d` (it accepts superscripts, as the
    # official code does), so runs are found by hand.
    out = []
    run_start = None
    for i, ch in enumerate(text):
        if ch.isdigit():
            if run_start is None:
                run_start = i
            continue
        if run_start is not None:
            out.append(engine.number_to_words(text[run_start:i]))
            run_start = None
        out.append(ch)
    if run_start is not None:
        out.append(engine.number_to_words(text[run_start:]))
    return "".join(out)


try:  # `regex` (a transformers dependency) tracks newer Unicode than the stdlib
    import regex as _regex

    _ONLY_PUNCT = _regex.compile(r"[\p{P}\p{S}]*")

    def is_only_punctuation(text: str) -> bool:
        """True for an empty string or one made only of punctuation (P*) and symbols (S*)."""
        return _ONLY_PUNCT.fullmatch(text) is not None

except ImportError:  # same classes from the stdlib's (older) Unicode tables

    def is_only_punctuation(text: str) -> bool:
        """True for an empty string or one made only of punctuation (P*) and symbols (S*)."""
        return all(unicodedata.category(ch)[0] in "PS" for ch in text)


def _rough_token_count(text: str) -> list[str]:
    return _ROUGH_TOKEN.findall(text)


def _cut_at_stops(text: str, stops: Sequence[str]) -> list[str]:
    """Cut `text` after every stop mark; a closing quote after a stop joins that sentence.

    Empty pieces (two stop marks in a row) are not produced. Text after the last
    stop is discarded: callers make sure the text ends with a stop.
    """
    pieces: list[str] = []
    start = 0
    n = len(text)
    for i, ch in enumerate(text):
        if ch not in stops:
            continue
        if i > start:
            pieces.append(text[start:i + 1])
        if i + 1 < n and text[i + 1] in _CLOSING_QUOTES:
            # The official splitter attaches the quote to the last sentence even
            # when this stop mark produced no piece of its own ("好!!\"" keeps
            # "好!\"", the second '!' is dropped); it crashes if there is no
            # sentence yet, where we keep the mark and quote as a piece.
            if pieces:
                pieces[-1] += text[i + 1]
            else:
                pieces.append(text[i:i + 2])
            start = i + 2
        else:
            start = i + 1
    return pieces


def split_paragraph(
    text: str,
    tokenize: Optional[Callable[[str], Sequence]] = None,
    lang: str = "zh",
    token_max_n: int = 80,
    token_min_n: int = 60,
    merge_len: int = 20,
    comma_split: bool = False,
) -> list[str]:
    """Split a normalised paragraph into pieces for synthesis.

    Sentences (cut at stop marks, and at commas if `comma_split`) are packed
    greedily: the current piece is closed when adding the next sentence would
    make it longer than `token_max_n` AND it is already longer than
    `token_min_n`. A final piece shorter than `merge_len` is glued to the
    previous one. Length is characters for "zh" and `len(tokenize(s))` for
    other languages (the official frontend passes the Qwen tokenizer's encode).
    A single sentence longer than `token_max_n` is never cut.
    """
    if not text:
        return []
    is_zh = lang == "zh"
    if is_zh:
        length = len
    else:
        counter = tokenize or _rough_token_count
        length = lambda s: len(counter(s))  # noqa: E731

    stops = list(_ZH_STOPS if is_zh else _EN_STOPS)
    if comma_split:
        stops.extend(_COMMAS)
    if text[-1] not in stops:
        text += "。" if is_zh else "."

    pieces: list[str] = []
    current = ""
    for sentence in _cut_at_stops(text, stops):
        if length(current + sentence) > token_max_n and length(current) > token_min_n:
            pieces.append(current)
            current = ""
        current += sentence
    if current:
        if pieces and length(current) < merge_len:
            pieces[-1] += current
        else:
            pieces.append(current)
    return pieces


@lru_cache(maxsize=None)
def _wetext_normalizer(lang: str):
    """One wetext Normalizer per language, or None if wetext is not installed.

    wetext ships its compiled grammars inside the wheel and loads them all at
    import (about 0.4 s, read-only, no network, nothing written to disk).
    """
    try:
        from wetext import Normalizer
    except ImportError:
        logger.warning("wetext is not installed: text normalisation (numbers, dates, units) is skipped")
        return None
    # remove_erhua=False as the official Chinese normaliser (keep 儿化 as written).
    return Normalizer(lang=lang, operator="tn", remove_erhua=False)


# wetext 0.1.x re-escapes token values, so '"' and '\' come back as '\"' and '\\'.
_WETEXT_ESCAPE = re.compile(r'\\(["\\])')
_DIGIT = re.compile(r"\d")
_BLANK_RUN = re.compile(r"\s+")


def _wetext_normalize(text: str, lang: str) -> str:
    r"""wetext's grammar of `lang` on `text`, as the official pin (wetext 0.0.4) runs it.

    wetext 0.0.4 runs a grammar only on text holding a digit (`re.search(r"\d", text)`: any Unicode
    decimal digit), for English as for Chinese, and hands it the text as it is. wetext 0.1.x also
    runs the English grammar on text without a digit (Mr. -> Mister, & -> and, U.S. -> US), so that
    case is decided here. With a digit, wetext 0.1.x gives what 0.0.4 gives with the same grammars
    (the lang we pass is the one "auto" picks in 0.0.4; see the module docstring for '2024').
    Their token parser asserts on some whitespace runs ("1.\n\nNext", "at  3", "a 1 \nb") and on
    some punctuation, where the official frontend raises: we try again with every whitespace run
    folded to one blank, and keep the text if that asserts too.
    """
    if not _DIGIT.search(text):
        return text
    normalizer = _wetext_normalizer(lang)
    if normalizer is None:
        return text
    try:
        out = normalizer.normalize(text)
    except AssertionError:
        folded = _BLANK_RUN.sub(" ", text)
        try:
            out = normalizer.normalize(folded) if folded != text else text
        except AssertionError:
            out = text
    if out.count("\\") > text.count("\\"):
        out = _WETEXT_ESCAPE.sub(r"\1", out)
    return out


def _normalize_zh(text: str) -> str:
    text = _wetext_normalize(text, "zh")
    text = text.replace("\n", "")
    text = replace_blank(text)
    text = replace_corner_mark(text)
    text = text.replace(".", "。")
    text = text.replace(" - ", "，")
    text = remove_bracket(text)
    # A paragraph that trails off in commas ends as a sentence.
    return re.sub(r"[，,、]+$", "。", text)


def _normalize_en(text: str) -> str:
    # whitespace is kept as it is (the official code does not touch it; the LM reads "\n\n" and
    # double blanks as tokens of their own)
    return spell_out_number(_wetext_normalize(text, "en"))


def has_markup(text: str) -> bool:
    """True if `text` carries CosyVoice control markup such as '<|endofprompt|>' or '<|en|>'."""
    return "<|" in text and "|>" in text


def normalize_text(
    text: str,
    *,
    split: bool = True,
    tokenize: Optional[Callable[[str], Sequence]] = None,
    token_max_n: int = 80,
    token_min_n: int = 60,
    merge_len: int = 20,
    comma_split: bool = False,
    text_frontend: bool = True,
) -> list[str] | str:
    """Normalise `text` for CosyVoice2 and (if `split`) cut it into synthesis pieces.

    Returns a list of pieces when `split` is true, else the normalised string.
    `tokenize(s)` returns the token ids of `s` (the Qwen tokenizer's encode); it
    only measures English pieces, and without it a word/punctuation count is
    used. Text with '<|...|>' markup, empty text, or `text_frontend=False` is
    returned unchanged (as `[text]` when splitting), like the official frontend.
    """
    if not text_frontend or text == "" or has_markup(text):
        return [text] if split else text
    text = text.strip()
    split_kwargs = dict(
        token_max_n=token_max_n, token_min_n=token_min_n, merge_len=merge_len, comma_split=comma_split
    )
    if contains_chinese(text):
        text = _normalize_zh(text)
        if not split:
            return text
        pieces = split_paragraph(text, None, "zh", **split_kwargs)
    else:
        text = _normalize_en(text)
        if not split:
            return text
        pieces = split_paragraph(text, tokenize, "en", **split_kwargs)
    return [p for p in pieces if not is_only_punctuation(p)]
