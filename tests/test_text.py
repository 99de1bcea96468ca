"""Tests for light_tts.frontend.text (CosyVoice2 text normalisation and splitting).

The REFERENCE tables were produced by the official CosyVoice `text_normalize`
(wetext 0.1.8, inflect 7.6; a one-token-per-word stand-in tokenizer) by
/work/refcheck/check_text.py; they are the expected outputs. Every English text
there holds a digit, where wetext 0.1.8 and the official pin (0.0.4) agree;
tests/test_text_official.py compares with recorded outputs of the official code
with wetext 0.0.4 itself, digit-free English included.
"""

import random
import subprocess
import sys

import pytest

from light_tts.frontend import text as T
from light_tts.frontend.text import is_only_punctuation, normalize_text, split_paragraph


def words(s):
    """Stand-in for the Qwen tokenizer's encode: one token per whitespace word."""
    return s.split()


# (input, official split=True output, official split=False output)
REFERENCE = [
    ("2024年3月5日，温度是-3.5℃", ["二零二四年三月五日，温度是负三点五摄氏度。"], "二零二四年三月五日，温度是负三点五摄氏度"),
    ("I have 23 apples and $4.50.", ["I have twenty three apples and four point five dollars."],
     "I have twenty three apples and four point five dollars."),
    ("我买了3个apple，花了12.5元，重2kg。", ["我买了三个apple，花了十二点五元，重两千克。"], "我买了三个apple，花了十二点五元，重两千克。"),
    ("Hello world, this is CosyVoice 2 speaking at 10:30 am on Jan 5, 2024.",
     ["Hello world, this is CosyVoice two speaking at ten thirty AM on the fifth of january, twenty twenty four."],
     "Hello world, this is CosyVoice two speaking at ten thirty AM on the fifth of january, twenty twenty four."),
    ("面积是100m²，体积是3m³（大约）。", ["面积是一百平方米，体积是三立方米大约。"], "面积是一百平方米，体积是三立方米大约。"),
    ("今天【重要】通知——明天 放假 - 大家好,", ["今天重要通知 明天放假-大家好。"], "今天重要通知 明天放假-大家好。"),
    ("收益率为25%，电话是13812345678。", ["收益率为百分之二十五，电话是幺三八幺二三四五六七八。"], "收益率为百分之二十五，电话是幺三八幺二三四五六七八。"),
    ("Mr. Smith paid 1/2 of the 3rd bill, about 20% more; wow!",
     ["Mister Smith paid one half of the third bill, about twenty percent more; wow!"],
     "Mister Smith paid one half of the third bill, about twenty percent more; wow!"),
    ("第1章\n第2节  内容 in English 很好.", ["第一章第二节内容in English很好。"], "第一章第二节内容in English很好。"),
    ("<|en|>keep 123 as is", ["<|en|>keep 123 as is"], "<|en|>keep 123 as is"),
    ("You are a helpful assistant.<|endofprompt|>用四川话说3句话。",
     ["You are a helpful assistant.<|endofprompt|>用四川话说3句话。"],
     "You are a helpful assistant.<|endofprompt|>用四川话说3句话。"),
    ("", [""], ""),
    ("！！！", [], "！！！"),
    ("...", [], "..."),
    ("他说：“今天是3月8号。”然后走了。", ["他说：“今天是三月八号。”然后走了。"], "他说：“今天是三月八号。”然后走了。"),
]


@pytest.mark.parametrize("text,pieces,joined", REFERENCE)
def test_matches_official_text_normalize(text, pieces, joined):
    assert normalize_text(text, tokenize=words) == pieces
    assert normalize_text(text, split=False, tokenize=words) == joined


def long_zh():
    rnd = random.Random(0)
    parts = []
    for _ in range(30):
        n = rnd.randint(5, 25)
        parts.append("".join(rnd.choice("我们今天天气很好大家一起去公园散步吧") for _ in range(n)) + rnd.choice("。！？，；"))
    return "".join(parts)


def long_en():
    rnd = random.Random(1)
    vocab = "the quick brown fox jumps over a lazy dog while birds sing in tall green trees".split()
    sents = []
    for _ in range(25):
        sent = " ".join(rnd.choice(vocab) for _ in range(rnd.randint(4, 14))).capitalize()
        sents.append(sent + rnd.choice([".", "!", "?", ",", ";"]))
    return " ".join(sents)


def test_long_chinese_matches_official_piece_lengths():
    text = long_zh()
    pieces = normalize_text(text, tokenize=words)
    assert [len(p) for p in pieces] == [69, 69, 75, 62, 77, 65, 66, 32]  # official
    assert "".join(pieces) == normalize_text(text, split=False)


def test_long_english_matches_official_piece_lengths():
    pieces = normalize_text(long_en(), tokenize=words)
    assert [len(p) for p in pieces] == [394, 376, 172]  # official, in characters


@pytest.mark.parametrize("max_n,min_n,merge", [(80, 60, 20), (30, 20, 5), (12, 4, 3)])
def test_zh_split_limits(max_n, min_n, merge):
    text = normalize_text(long_zh(), split=False)
    sentences = T._cut_at_stops(text, T._ZH_STOPS)
    longest = max(len(s) for s in sentences)
    pieces = normalize_text(long_zh(), token_max_n=max_n, token_min_n=min_n, merge_len=merge)
    assert len(pieces) > 1
    assert "".join(pieces) == text  # nothing lost, nothing added
    for p in pieces:
        assert p and not is_only_punctuation(p)
        assert p[-1] in T._ZH_STOPS
    for p in pieces[:-1]:
        # a piece is closed only once it is longer than min_n, and it grows past
        # max_n only by one sentence started while it was still short
        assert min_n < len(p) <= max(max_n, min_n + longest)
    assert len(pieces[-1]) <= max(max_n, min_n + longest) + merge


def test_en_split_counts_with_given_tokenizer():
    text = long_en()
    calls = []

    def counting(s):
        calls.append(s)
        return s.split()

    by_words = normalize_text(text, tokenize=counting, token_max_n=30, token_min_n=20, merge_len=5)
    assert calls and all(isinstance(c, str) for c in calls)
    for p in by_words[:-1]:
        assert 20 < len(p.split())
    # one token per character is a much finer count: more pieces
    by_chars = normalize_text(text, tokenize=list, token_max_n=30, token_min_n=20, merge_len=5)
    assert len(by_chars) > len(by_words)
    assert " ".join(by_words).replace(" ", "") == " ".join(by_chars).replace(" ", "")


def test_en_split_without_tokenizer_uses_rough_count():
    pieces = normalize_text(long_en(), token_max_n=30, token_min_n=20, merge_len=5)
    assert len(pieces) > 3 and all(pieces)


def test_punctuation_only_pieces_dropped():
    assert normalize_text("……") == []
    assert normalize_text("?!") == []
    # repeated stops make no empty pieces; a stop-only tail is glued on, never alone
    assert normalize_text("你好。。。！") == ["你好。"]
    assert normalize_text("你好！", token_max_n=1, token_min_n=0, merge_len=0) == ["你好！"]
    assert normalize_text("Hi.…", tokenize=list, token_max_n=1, token_min_n=0, merge_len=0) == ["Hi."]
    assert normalize_text("Hi.…", tokenize=list) == ["Hi.…."]


def test_whitespace_only_input():  # the official code raises IndexError here
    assert normalize_text("   ") == []
    assert normalize_text(" \n ", split=False) == ""


def test_markup_and_frontend_off_skip_normalisation():
    assert normalize_text("<|zh|>3个", split=False) == "<|zh|>3个"
    # both halves of the marker are needed
    assert normalize_text("<|zh 3个", split=False) == "<|zh三个"
    assert normalize_text("3个苹果", text_frontend=False) == ["3个苹果"]


def test_mixed_text_goes_chinese_path():
    # official output; wetext reads the lone "2" as 两
    assert normalize_text("CosyVoice 2 支持 10 种语言.", split=False) == "CosyVoice两支持十种语言。"


def test_idempotent_on_normalised_text():
    for text in ["2024年3月5日，温度是-3.5℃", "我买了3个apple，花了12.5元，重2kg。",
                 "I have 23 apples and $4.50.", "Mr. Smith paid 1/2 of the 3rd bill."]:
        once = normalize_text(text, split=False)
        assert normalize_text(once, split=False) == once
        assert not any(ch.isdigit() for ch in once)


# Deliberate differences from official code + wetext 0.1.x (see module docstring).
def test_wetext_quote_escaping_is_undone():
    assert normalize_text('He said "it is 5" and left.') == ['He said "it is five" and left.']
    assert normalize_text('他说"你好"，今天是3号。') == ['他说"你好"，今天是三号。']
    assert normalize_text("a \\ b 3", split=False) == "a \\ b three"


def test_english_without_a_digit_is_left_alone():
    # wetext 0.0.4 (the official pin) runs no grammar on text without a digit; 0.1.x runs the English one
    text = "Mr. Brown & Mrs. Green live on Baker St. near the U.S. border."
    assert normalize_text(text, tokenize=words) == [text]
    # whitespace is kept as the official code keeps it
    assert normalize_text("First line.\n\nSecond  line, no digits here.", tokenize=words) == \
        ["First line.\n\nSecond  line, no digits here."]
    assert normalize_text("a\tb  c", split=False) == "a\tb  c"
    # with a digit the English grammar reads the whole text
    assert normalize_text("Mr. Brown paid $5.", split=False) == "Mister Brown paid five dollars."


def test_whitespace_wetext_rejects_is_folded():
    # the official code raises AssertionError here (wetext's token parser); we read the folded text
    assert normalize_text("Call me at  3 pm, or\ttext me.", split=False) == "Call me at three PM, or text me."
    assert normalize_text("Line 1.\n\nLine  2.", tokenize=words) == ["Line one. Line two."]
    # only text wetext rejects is folded: a lone newline goes to the grammar as it is (which drops
    # it after a stop, as the official code does)
    assert normalize_text("Line 1.\nLine 2.", split=False) == "Line one.Line two."
    assert normalize_text("Line one.\n\nLine  two.", split=False) == "Line one.\n\nLine  two."


def test_english_digits_only_stay_english():
    assert normalize_text("2024") == ["twenty twenty four."]
    assert normalize_text("12", split=False) == "twelve"


# Helpers, against hand-written expectations.
def test_helpers():
    assert T.contains_chinese("abc中") and not T.contains_chinese("abc。")
    assert T.replace_blank("你好 world and  more 中 文") == "你好world andmore中文"
    assert T.replace_corner_mark("m² m³") == "m平方 m立方"
    assert T.remove_bracket("（a）【b】`c`——d") == "abc d"
    assert T.spell_out_number("I have 23 apples, 4.50 and 1000000") == \
        "I have twenty-three apples, four.fifty and one million"
    assert T.spell_out_number("no digits") == "no digits"


def test_is_only_punctuation():
    assert is_only_punctuation("")
    assert is_only_punctuation("，。！？…“”")
    assert is_only_punctuation("$%+=")  # symbols count too
    assert not is_only_punctuation("a.")
    assert not is_only_punctuation("。你")
    assert not is_only_punctuation(" ")


def test_split_paragraph_quotes_and_commas():
    assert split_paragraph('他说："好。"走吧', None, "zh", 3, 1, 1) == ['他说："', '好。"', "走吧。"]
    # the official splitter keeps only the first of two stops before a quote
    assert split_paragraph('好!!"走', None, "zh", 2, 1, 1) == ['好!"', "走。"]
    # a leading stop+quote (the official code raises IndexError)
    assert split_paragraph('!"ok', list, "en", 1, 0, 0) == ['!"', "ok."]
    assert split_paragraph("一，二，三", None, "zh", 2, 1, 1) == ["一，二，三。"]
    assert split_paragraph("一，二，三", None, "zh", 2, 1, 1, comma_split=True) == ["一，", "二，", "三。"]
    assert split_paragraph("", None, "zh") == []


def test_wetext_needs_no_network():
    code = (
        "import socket\n"
        "def _no(*a, **k): raise OSError('network used')\n"
        "socket.socket = _no; socket.create_connection = _no; socket.getaddrinfo = _no\n"
        "from light_tts.frontend.text import normalize_text\n"
        "print(normalize_text('2024年3月5日', split=False))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "二零二四年三月五日"
