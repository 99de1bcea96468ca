"""The encode stage: text -> token ids, prompt audio -> a Voice, as the official frontend does.

    fe = Frontend("models/tiny")
    voice = fe.encode_voice(open("prompt.wav", "rb").read(), "transcript of the prompt")
    pieces = fe.normalize("text to speak")          # sentences, normalised
    ids = fe.tokenize(pieces[0])

Prompt audio goes through three feature paths (DESIGN §3): 16 kHz whisper log-mel ->
speech_tokenizer_v2.onnx -> 25 Hz tokens; 16 kHz Kaldi fbank (mean-normalised) -> campplus.onnx ->
192-d embedding; 24 kHz mel -> prompt feat, trimmed so feat frames = 2 x tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnxruntime

from light_tts.frontend.audio import AudioError, load_audio
from light_tts.frontend.features import align_feat_and_tokens, kaldi_fbank, prompt_mel_24k, whisper_log_mel
from light_tts.frontend.text import normalize_text
from light_tts.frontend.tokenizer import CosyVoice2Tokenizer
from light_tts.frontend.voice_cache import Voice, VoiceCache, load_spk2info, upload_key
from light_tts.models.loading import require_file


@dataclass(frozen=True)
class PromptLimits:
    min_seconds: float = 0.5
    max_seconds: float = 30.0   # the official speech tokenizer refuses longer prompts


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
        self.tokenizer = CosyVoice2Tokenizer(os.path.join(model_dir, "CosyVoice-BlankEN"))
        self.speech_tokenizer = _onnx_session(require_file(model_dir, "speech_tokenizer_v2.onnx"), onnx_threads, use_cuda,
                                              cuda_mem_limit)
        self.campplus = _onnx_session(require_file(model_dir, "campplus.onnx"), onnx_threads, False)
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

    def instruct_ids(self, instruct_text: str) -> list[int]:
        """The instruction as the LM was trained to see it: ending in <|endofprompt|> (the official
        examples pass it that way; appended here when the caller left it out)."""
        marker = "<|endofprompt|>"
        text = instruct_text.strip()
        return self.tokenize(text if text.endswith(marker) else text + marker)

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
        feat = prompt_mel_24k(audio24k)[0].numpy()
        feat, tokens, n = align_feat_and_tokens(feat, tokens, ratio=2)
        if n == 0:
            raise AudioError("the prompt produced no speech tokens; use a longer recording")
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
