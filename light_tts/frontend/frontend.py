"""The encode stage: text -> token ids, prompt audio -> a Voice, as the official frontend does.

    fe = Frontend("models/tiny")                     # the family is read from the directory
    fe.family                                        # "cosyvoice2" or "cosyvoice3"
    voice = fe.encode_voice(open("prompt.wav", "rb").read(), "transcript of the prompt")
    pieces = fe.normalize("text to speak")          # sentences, normalised
    ids = fe.tokenize(pieces[0])
    prompt_ids, prompt_speech = fe.lm_prompt("instruct2", voice, instruct_text="...")

Prompt audio goes through three feature paths (DESIGN §3): 16 kHz whisper log-mel ->
speech_tokenizer_v2.onnx (CosyVoice2) / speech_tokenizer_v3.onnx (CosyVoice3) -> 25 Hz tokens;
16 kHz Kaldi fbank (mean-normalised) -> campplus.onnx -> 192-d embedding; 24 kHz mel -> prompt
feat, trimmed so feat frames = 2 x tokens.

What differs between the families (the official CosyVoice3 reuses CosyVoice2's frontend class):
  * the text tokenizer's added tokens (light_tts.frontend.tokenizer; CosyVoice2's ids unchanged);
  * the speech tokenizer file; v3 is called exactly as v2 (same 128-bin whisper log-mel, int32
    lengths, inputs by position, first output flattened, the same 30 s limit);
  * the prompt mel: the CosyVoice3 yaml's feat_extractor has fmax null (librosa: sr / 2 = 12 kHz)
    where CosyVoice2's has 8000;
  * the CosyVoice3 LM asserts `<|endofprompt|>` is among the text it sees: see CosyVoice3Prompts.
Text normalisation and sentence splitting are the same function with the same limits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnxruntime

from light_tts.frontend.audio import AudioError, load_audio
from light_tts.frontend.features import (MEL24K_FMAX, align_feat_and_tokens, kaldi_fbank, prompt_mel_24k,
                                         whisper_log_mel)
from light_tts.frontend.text import normalize_text
from light_tts.frontend.tokenizer import ENDOFPROMPT, CosyVoice2Tokenizer, CosyVoice3Tokenizer
from light_tts.frontend.voice_cache import Voice, VoiceCache, load_spk2info, upload_key
from light_tts.models import loading, pretrained

MODES = ("zero_shot", "cross_lingual", "instruct2")
EMPTY_IDS = np.zeros(0, dtype=np.int32)

# The system prompt of every official CosyVoice3 example and of its serving runtime
# (runtime/triton_trtllm: `'You are a helpful assistant.<|endofprompt|>' + prompt_text` when the
# marker is missing); the instructions the model was trained on (cosyvoice/utils/common.py
# instruct_list) read "You are a helpful assistant. <instruction><|endofprompt|>".
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class PromptLimits:
    min_seconds: float = 0.5
    max_seconds: float = 30.0   # the official speech tokenizer refuses longer prompts


class CosyVoice2Prompts:
    """What the CosyVoice2 LM sees before the text to speak, per mode (official frontend_*):
    zero_shot: the prompt transcript (normalised) and the prompt speech tokens; cross_lingual:
    nothing; instruct2: the instruction, ending in <|endofprompt|>, and no speech tokens."""

    def prompt_text(self, text: str) -> str:
        return text

    def instruct_text(self, text: str) -> str:
        """The official examples end the instruction with <|endofprompt|>; appended when missing."""
        text = text.strip()
        return text if text.endswith(ENDOFPROMPT) else text + ENDOFPROMPT

    def cross_lingual_prompt(self, tts_text: str) -> str:
        return ""


class CosyVoice3Prompts(CosyVoice2Prompts):
    """CosyVoice3: the LM refuses text without `<|endofprompt|>` (official llm.py asserts id 151646
    is in prompt_text + text); what comes before the marker is a system prompt / instruction.

    Decision: where the caller's text lacks the marker we add the documented default, the system
    prompt of every official CosyVoice3 example and of the official serving runtime (which does the
    same for the prompt transcript), instead of refusing: a CosyVoice2 client sends plain transcripts
    and instructions, and the official model expects exactly this prefix. Text that carries the
    marker is passed through untouched, so official-style inputs give the official ids.
      zero_shot     "t"  -> "You are a helpful assistant.<|endofprompt|>t" (not normalised: the
                    official text_normalize skips text holding '<|...|>', so the official call with
                    the prefixed transcript sees it raw; "" gives the bare system prompt)
      instruct2     "i"  -> "You are a helpful assistant. i<|endofprompt|>" (the trained format);
                    the official passes instruct_text raw, so it is not stripped when it has the marker
      cross_lingual the official LM sees only the text to speak, and its examples prefix that text
                    with "You are a helpful assistant.<|endofprompt|>". We give the LM the system
                    prompt as prompt text instead: the same LM input, while the text to speak is still
                    normalised and split (the official skips both once the prefix is in it) and the
                    speech-length bounds count only the text to speak. Text to speak that carries the
                    marker itself is left as the official leaves it, with no prompt text added.
    """
    DEFAULT = SYSTEM_PROMPT + ENDOFPROMPT

    def prompt_text(self, text: str) -> str:
        return text if ENDOFPROMPT in text else self.DEFAULT + text

    def instruct_text(self, text: str) -> str:
        if ENDOFPROMPT in text:
            return text
        text = text.strip()
        if not text:
            return self.DEFAULT
        if not text.startswith(SYSTEM_PROMPT):
            text = f"{SYSTEM_PROMPT} {text}"
        return text + ENDOFPROMPT

    def cross_lingual_prompt(self, tts_text: str) -> str:
        return "" if ENDOFPROMPT in tts_text else self.DEFAULT


@dataclass(frozen=True)
class FrontendFamily:
    """The per-family parts of the frontend."""
    name: str
    speech_tokenizer: str           # file name (pretrained.Family.speech_tokenizer)
    tokenizer: type
    mel_fmax: Optional[float]       # the official yaml's feat_extractor.fmax (None: sr / 2)
    prompts: CosyVoice2Prompts


FRONTEND_FAMILIES = {
    "cosyvoice2": FrontendFamily("cosyvoice2", pretrained.COSYVOICE2.speech_tokenizer, CosyVoice2Tokenizer, MEL24K_FMAX,
                                 CosyVoice2Prompts()),
    "cosyvoice3": FrontendFamily("cosyvoice3", pretrained.COSYVOICE3.speech_tokenizer, CosyVoice3Tokenizer, None,
                                 CosyVoice3Prompts()),
}


def frontend_family(model_dir: str) -> str:
    """The family of a model directory: its yaml decides (official AutoModel order); a directory
    with the frontend files only, by its speech tokenizer; CosyVoice2 when neither tells."""
    for family in pretrained.FAMILIES.values():
        if os.path.isfile(os.path.join(model_dir, family.yaml)):
            return family.name
    for family in pretrained.FAMILIES.values():
        if os.path.isfile(os.path.join(model_dir, family.speech_tokenizer)):
            return family.name
    return pretrained.COSYVOICE2.name


def _require_file(model_dir: str, name: str, family: str) -> str:
    if family == pretrained.COSYVOICE2.name:
        return loading.require_file(model_dir, name)
    return pretrained.require_file(model_dir, name, pretrained.FAMILIES[family])


def _onnx_session(path: str, threads: int, use_cuda: bool, cuda_mem_limit: int = 0) -> onnxruntime.InferenceSession:
    """cuda_mem_limit: bytes the CUDA provider's arena may hold (0: no cap; --gpu_memory_limit_gb)."""
    opts = onnxruntime.SessionOptions()
    opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if use_cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        cuda = {"gpu_mem_limit": cuda_mem_limit, "arena_extend_strategy": "kSameAsRequested"} if cuda_mem_limit else {}
        providers.insert(0, ("CUDAExecutionProvider", cuda))
    return onnxruntime.InferenceSession(path, sess_options=opts, providers=providers)


class Frontend:
    def __init__(self, model_dir: str, *, cache_capacity: int = 100, limits: PromptLimits = PromptLimits(),
                 onnx_threads: int = 1, use_cuda: bool = False, cuda_mem_limit: int = 0):
        self.limits = limits
        spec = FRONTEND_FAMILIES[frontend_family(model_dir)]
        self.family, self.prompts, self.mel_fmax = spec.name, spec.prompts, spec.mel_fmax
        self.tokenizer = spec.tokenizer(os.path.join(model_dir, "CosyVoice-BlankEN"))
        self.speech_tokenizer = _onnx_session(_require_file(model_dir, spec.speech_tokenizer, spec.name), onnx_threads,
                                              use_cuda, cuda_mem_limit)
        self.campplus = _onnx_session(_require_file(model_dir, "campplus.onnx", spec.name), onnx_threads, False)
        self.cache = VoiceCache(cache_capacity)
        spk2info = os.path.join(model_dir, "spk2info.pt")
        if os.path.isfile(spk2info):
            for spk_id, voice in load_spk2info(spk2info).items():
                self.cache.register(spk_id, voice)

    # text
    def normalize(self, text: str, split: bool = True):
        return normalize_text(text, split=split, tokenize=self.tokenizer.encode)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def prompt_text(self, text: str) -> str:
        """The prompt transcript as the LM needs it, before normalisation (CosyVoice3: carrying
        <|endofprompt|>, see CosyVoice3Prompts; CosyVoice2: unchanged)."""
        return self.prompts.prompt_text(text)

    def instruct_ids(self, instruct_text: str) -> list[int]:
        """The instruction as the LM was trained to see it: ending in <|endofprompt|> (the official
        examples pass it that way; appended here when the caller left it out; CosyVoice3 adds its
        system prompt too, see CosyVoice3Prompts)."""
        return self.tokenize(self.prompts.instruct_text(instruct_text))

    def lm_prompt(self, mode: str, voice: Voice, *, instruct_text: str = "",
                  tts_text: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(prompt text ids, prompt speech tokens) the LM sees before the text to speak, as the
        official frontend_zero_shot / frontend_cross_lingual / frontend_instruct2 build them.
        tts_text (cross_lingual): the request's text to speak, before normalisation."""
        if mode == "zero_shot":
            return voice.prompt_text_ids, voice.speech_tokens
        if mode == "cross_lingual":
            prompt = self.prompts.cross_lingual_prompt(tts_text)
            return (np.asarray(self.tokenize(prompt), dtype=np.int32) if prompt else EMPTY_IDS), EMPTY_IDS
        if mode == "instruct2":
            return np.asarray(self.instruct_ids(instruct_text), dtype=np.int32), EMPTY_IDS
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")

    # audio
    def speech_tokens(self, audio16k: np.ndarray) -> np.ndarray:
        mel = whisper_log_mel(audio16k).numpy()
        inputs = self.speech_tokenizer.get_inputs()
        out = self.speech_tokenizer.run(None, {inputs[0].name: mel,
                                               inputs[1].name: np.array([mel.shape[2]], dtype=np.int32)})[0]
        return np.asarray(out).reshape(-1).astype(np.int32)

    def speaker_embedding(self, audio16k: np.ndarray) -> np.ndarray:
        fbank = kaldi_fbank(audio16k).numpy()[None]
        out = self.campplus.run(None, {self.campplus.get_inputs()[0].name: fbank})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def prompt_feat(self, audio24k: np.ndarray) -> np.ndarray:
        """24 kHz mel [T, 80] with this family's band (official feat_extractor). prompt_mel_24k's
        default band is CosyVoice2's; the full band needs its `fmax` keyword."""
        kwargs = {} if self.mel_fmax == MEL24K_FMAX else {"fmax": self.mel_fmax}
        return prompt_mel_24k(audio24k, **kwargs)[0].numpy()

    def encode_voice(self, audio: bytes, prompt_text: str, *, use_cache: bool = True) -> Voice:
        """Encode a prompt recording and its transcript (cached by audio hash + text)."""
        key = upload_key(audio, prompt_text)
        if use_cache:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        lim = self.limits
        audio16k = load_audio(audio, 16000, min_seconds=lim.min_seconds, max_seconds=lim.max_seconds)
        audio24k = load_audio(audio, 24000, min_seconds=lim.min_seconds, max_seconds=lim.max_seconds)
        tokens = self.speech_tokens(audio16k)
        feat = self.prompt_feat(audio24k)
        feat, tokens, n = align_feat_and_tokens(feat, tokens, ratio=2)
        if n == 0:
            raise AudioError("the prompt produced no speech tokens; use a longer recording")
        prompt_text = self.prompt_text(prompt_text)
        prompt_text = normalize_text(prompt_text, split=False, tokenize=self.tokenizer.encode) if prompt_text else ""
        voice = Voice(prompt_text_ids=np.asarray(self.tokenize(prompt_text), dtype=np.int32),
                      speech_tokens=np.ascontiguousarray(tokens, dtype=np.int32),
                      embedding=self.speaker_embedding(audio16k),
                      prompt_feat=np.ascontiguousarray(feat, dtype=np.float32))
        if use_cache:
            self.cache.put(key, voice)
        return voice

    def registered_voice(self, voice_id: str) -> Optional[Voice]:
        return self.cache.voice(voice_id)
