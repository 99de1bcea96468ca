"""CosyVoice2 / CosyVoice3 text tokenizer: Qwen2 byte-level BPE plus each family's added tokens.

Reads the official `CosyVoice-BlankEN/` files (vocab.json, merges.txt,
tokenizer_config.json) with the `tokenizers` library and builds the same pipeline
transformers builds for a Qwen2 tokenizer: NFC normalisation, the Qwen2 split regex,
byte-level mapping, BPE without unknown token, byte-level decoding.  Added tokens are
registered in the order transformers assigns them, so ids equal the official ones:

1. the tokens listed in tokenizer_config.json `added_tokens_decoder`, by id
   (Qwen2: <|endoftext|>, <|im_start|>, <|im_end|> right after the BPE ids);
2. the special tokens named by the config's eos/pad/unk/bos fields, if still missing;
3. the family's additions (eos/pad <|endoftext|>, then the class's ADDITIONAL_TOKENS in
   list order), skipping the ones already present.

CosyVoice2Tokenizer and CosyVoice3Tokenizer differ only in that list; text_tokenizer(dir,
version) picks one by the official yaml's `get_tokenizer.version` ("cosyvoice2" / "cosyvoice3").
CosyVoice3's list is CosyVoice2's followed by <|endofsystem|>, 84 ARPAbet
phone tokens and 176 pinyin tokens ("hotfix" pronunciations such as "[j][ǐ]"), so every
CosyVoice2 id keeps its value.  With the official files <|endofprompt|> gets 151646 in both
families (the official llm.py hard-codes it) and the text vocabulary ends at 151663
(CosyVoice2) or 151924 (CosyVoice3).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Same pattern as light_tts.tools.tokenizer_files (kept here so the runtime path does
# not import the generator).
_QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

COSYVOICE2_EOS_TOKEN = "<|endoftext|>"
# Ends the prompt (instruction / system prompt + transcript) in the LM's text; 151646 with the Qwen2 files.
ENDOFPROMPT = "<|endofprompt|>"

# The official CosyVoice2 list, order matters: it fixes the ids of the new tokens.
COSYVOICE2_ADDITIONAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", ENDOFPROMPT,
    "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]",
    "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
)

# CosyVoice3 appends <|endofsystem|> and pronunciation tokens, in this order:
# ARPAbet (CMU) phones in alphabetical order, each vowel followed by its stress variants 0/1/2;
_ARPABET_VOWELS = "AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split()
_ARPABET_CONSONANTS = "B CH D DH F G HH JH K L M N NG P R S SH T TH V W Y Z ZH".split()
# then pinyin initials and toned finals, sorted by code point (so ASCII first, then ià, iá, ...).
_PINYIN_UNITS = """
    a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié
    iòng ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s
    sh t u uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī
    uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng
    ér ì ìn ìng í ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn
    īng ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ
""".split()


def _arpabet_tokens() -> tuple[str, ...]:
    tokens = []
    for phone in sorted(_ARPABET_VOWELS + _ARPABET_CONSONANTS):
        tokens.append(f"[{phone}]")
        if phone in _ARPABET_VOWELS:
            tokens += [f"[{phone}{stress}]" for stress in "012"]
    return tuple(tokens)


COSYVOICE3_ADDITIONAL_TOKENS = (
    COSYVOICE2_ADDITIONAL_TOKENS + ("<|endofsystem|>",) + _arpabet_tokens()
    + tuple(f"[{unit}]" for unit in sorted(_PINYIN_UNITS))
)
assert len(COSYVOICE3_ADDITIONAL_TOKENS) == 280 == len(set(COSYVOICE3_ADDITIONAL_TOKENS))


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            # transformers skips a leading "#version:" header and blank lines.
            if (i == 0 and line.startswith("#version:")) or not line:
                continue
            left, right = line.split()
            merges.append((left, right))
    return merges


def _config_token(value) -> str | None:
    if isinstance(value, dict):  # serialised AddedToken
        return value.get("content")
    return value


class CosyVoice2Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, with the official ids.

    Special tokens written in the text (e.g. "<|endofprompt|>", "[breath]") are always
    recognised as single tokens: that is what the official tokenizer does (it accepts an
    `allowed_special` argument and ignores it, which equals tiktoken's 'all').
    decode drops special tokens when skip_special_tokens is set (the official yaml sets
    it to True).
    """
    VERSION = "cosyvoice2"
    ADDITIONAL_TOKENS = COSYVOICE2_ADDITIONAL_TOKENS

    def __init__(self, token_dir: str | os.PathLike, skip_special_tokens: bool = True):
        token_dir = Path(token_dir)
        with open(token_dir / "vocab.json", encoding="utf-8") as f:
            vocab: dict[str, int] = json.load(f)
        merges = _read_merges(token_dir / "merges.txt")
        config_path = token_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}

        tok = Tokenizer(models.BPE(
            vocab=vocab, merges=merges, dropout=None, unk_token=None,
            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
        ))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        self._tokenizer = tok
        self.num_bpe_tokens = len(vocab)

        # 1. tokens the config pins to ids; check they land where the file says.
        declared = config.get("added_tokens_decoder", {})
        for token_id in sorted(declared, key=int):
            entry = declared[token_id]
            self._add(AddedToken(
                entry["content"], single_word=entry.get("single_word", False),
                lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                normalized=entry.get("normalized", False), special=entry.get("special", True),
            ), special=entry.get("special", True))
            actual = tok.token_to_id(entry["content"])
            if actual != int(token_id):
                raise ValueError(f"{config_path}: {entry['content']!r} declared as id {token_id}, "
                                 f"but the vocabulary gives it {actual}")
        # 2. the config's named special tokens (transformers' Qwen2 defaults otherwise).
        for key, default in (("bos_token", None), ("eos_token", "<|endoftext|>"),
                             ("unk_token", "<|endoftext|>"), ("pad_token", "<|endoftext|>")):
            content = _config_token(config.get(key, default))
            if content:
                self._add_special(content)
        # 3. the family's additions.
        self._add_special(COSYVOICE2_EOS_TOKEN)
        for content in self.ADDITIONAL_TOKENS:
            self._add_special(content)

        self.skip_special_tokens = skip_special_tokens
        self.eos_token_id = tok.token_to_id(COSYVOICE2_EOS_TOKEN)

    def _add(self, token: AddedToken, special: bool) -> None:
        if special:
            self._tokenizer.add_special_tokens([token])
        else:
            self._tokenizer.add_tokens([token])

    def _add_special(self, content: str) -> None:
        if self._tokenizer.token_to_id(content) is None:
            self._add(AddedToken(content, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=True), special=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids, BPE plus added tokens (151663 / 151924 for the official files)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, allowed_special: str = "all", **kwargs) -> list[int]:
        # `allowed_special` exists for call compatibility with the official frontend,
        # which passes it; special tokens are always recognised (see class docstring).
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=self.skip_special_tokens)


class CosyVoice3Tokenizer(CosyVoice2Tokenizer):
    """The CosyVoice3 token set (CosyVoice2's ids unchanged, 261 more after them)."""
    VERSION = "cosyvoice3"
    ADDITIONAL_TOKENS = COSYVOICE3_ADDITIONAL_TOKENS


TOKENIZERS = {cls.VERSION: cls for cls in (CosyVoice2Tokenizer, CosyVoice3Tokenizer)}


def text_tokenizer(token_dir: str | os.PathLike, version: str = "cosyvoice2",
                   skip_special_tokens: bool = True) -> CosyVoice2Tokenizer:
    """The tokenizer of one family, by the official yaml's `get_tokenizer.version`."""
    if version not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer version {version!r}; choose from {tuple(TOKENIZERS)}")
    return TOKENIZERS[version](token_dir, skip_special_tokens=skip_special_tokens)
