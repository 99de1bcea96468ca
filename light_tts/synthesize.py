"""Offline zero-shot synthesis on the plain-PyTorch path: the reference for the server.

    python -m light_tts.synthesize --model_dir models/tiny --prompt_wav prompt.wav \\
        --prompt_text "what the prompt says" --tts_text "what to say" --out out.wav [--stream]

Modes as the official CosyVoice2: zero_shot (the LM sees the prompt text and prompt speech
tokens), cross_lingual (the LM sees neither; only the flow is conditioned on the prompt) and
instruct2 (the LM sees the instruction instead of the prompt text, and no prompt speech tokens).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Iterator, Optional

import numpy as np
import torch

from light_tts.audio_out import SAMPLE_RATE, pcm16_bytes
from light_tts.frontend.audio import AudioError
from light_tts.frontend.frontend import Frontend
from light_tts.frontend.voice_cache import Voice
from light_tts.models.cosyvoice2 import CosyVoice2Model
from light_tts.models.loading import ModelLoadError
from light_tts.models.token2wav import StreamSchedule, Token2Wav, stream_chunks

MODES = ("zero_shot", "cross_lingual", "instruct2")


def synthesize_piece(model: CosyVoice2Model, voice: Voice, text_ids: list[int], *, mode: str = "zero_shot",
                     instruct_ids: Optional[list[int]] = None, stream: bool = False, speed: float = 1.0,
                     seed: Optional[int] = 0, max_speech_tokens: Optional[int] = None,
                     fixed_speech_tokens: Optional[int] = None, greedy: bool = False) -> Iterator[np.ndarray]:
    """Audio chunks (float32, 24 kHz) for one normalised text piece."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    prompt_text, prompt_speech = voice.prompt_text_ids, voice.speech_tokens
    if mode == "cross_lingual":
        prompt_text, prompt_speech = None, None
    elif mode == "instruct2":
        prompt_text, prompt_speech = instruct_ids or [], None
    tokens = model.llm.inference(text_ids, prompt_text, prompt_speech, seed=seed, greedy=greedy,
                                 max_new_tokens=max_speech_tokens, fixed_new_tokens=fixed_speech_tokens)
    t2w = Token2Wav(model.flow, model.hift, torch.from_numpy(voice.speech_tokens),
                    torch.from_numpy(voice.prompt_feat), torch.from_numpy(voice.embedding),
                    StreamSchedule(pre_lookahead_len=model.flow.pre_lookahead_len), seed=seed)
    yield from stream_chunks(tokens, t2w, stream=stream, speed=speed)


def synthesize(model: CosyVoice2Model, frontend: Frontend, tts_text: str, voice: Voice, *,
               mode: str = "zero_shot", instruct_text: str = "", **kwargs) -> Iterator[np.ndarray]:
    """Normalise and split `tts_text`, then synthesise each piece in turn."""
    instruct_ids = frontend.instruct_ids(instruct_text) if mode == "instruct2" else None
    for piece in frontend.normalize(tts_text, split=True):
        yield from synthesize_piece(model, voice, frontend.tokenize(piece), mode=mode,
                                    instruct_ids=instruct_ids, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Offline CosyVoice2 synthesis (plain PyTorch reference path)")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--prompt_wav", required=True, help="prompt recording (WAV, FLAC, OGG or MP3; 0.5-30 s)")
    p.add_argument("--prompt_text", default="", help="transcript of the prompt (zero_shot)")
    p.add_argument("--tts_text", required=True, help="text to speak")
    p.add_argument("--out", required=True, help="output WAV (24 kHz mono PCM16)")
    p.add_argument("--mode", choices=MODES, default="zero_shot")
    p.add_argument("--instruct_text", default="", help="instruction for --mode instruct2")
    p.add_argument("--stream", action="store_true", help="decode chunk by chunk as the official streaming does")
    p.add_argument("--speed", type=float, default=1.0, help="tempo (non-streaming only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_speech_tokens", type=int, default=None,
                   help="cap on speech tokens per sentence (random weights rarely emit eos)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = p.parse_args(argv)
    if args.mode == "zero_shot" and not args.prompt_text:
        p.error("--prompt_text is required for --mode zero_shot")
    if args.mode == "instruct2" and not args.instruct_text:
        p.error("--instruct_text is required for --mode instruct2")
    if args.stream and args.speed != 1.0:
        p.error("--speed works only without --stream (as the official CosyVoice2)")
    if not args.tts_text.strip():
        p.error("--tts_text is empty")

    import soundfile as sf
    if args.device == "cpu":
        torch.set_flush_denormal(True)  # random and real weights produce subnormals: 2x slower CPU math
    t0 = time.perf_counter()
    try:
        model = CosyVoice2Model.from_pretrained(args.model_dir, device=args.device, dtype=args.dtype)
        frontend = Frontend(args.model_dir)
        with open(args.prompt_wav, "rb") as f:
            voice = frontend.encode_voice(f.read(), args.prompt_text)
    except (ModelLoadError, AudioError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded in {time.perf_counter() - t0:.2f} s; prompt: {len(voice.speech_tokens)} speech tokens")

    t_start = time.perf_counter()
    samples = 0
    first_chunk = None
    with sf.SoundFile(args.out, "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as out:
        for i, chunk in enumerate(synthesize(model, frontend, args.tts_text, voice, mode=args.mode,
                                             instruct_text=args.instruct_text, stream=args.stream,
                                             speed=args.speed, seed=args.seed,
                                             max_speech_tokens=args.max_speech_tokens)):
            now = time.perf_counter() - t_start
            first_chunk = now if first_chunk is None else first_chunk
            out.write(np.frombuffer(pcm16_bytes(chunk), dtype="<i2"))
            samples += len(chunk)
            if args.stream:
                print(f"chunk {i}: {len(chunk) / SAMPLE_RATE:.2f} s of audio at {now * 1e3:.0f} ms")
    total = time.perf_counter() - t_start
    if first_chunk is None:
        print("error: the text has nothing to speak after normalisation", file=sys.stderr)
        return 2
    seconds = samples / SAMPLE_RATE
    print(f"wrote {args.out}: {seconds:.2f} s of audio in {total:.2f} s (RTF {total / max(seconds, 1e-9):.2f}, "
          f"first audio after {first_chunk * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
