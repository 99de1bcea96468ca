"""Offline synthesis on the plain-PyTorch path: the reference for the server, CosyVoice2 or
CosyVoice3 (the family is read from the model directory).

    python -m light_tts.synthesize --model_dir models/tiny --prompt_wav prompt.wav \\
        --prompt_text "what the prompt says" --tts_text "what to say" --out out.wav [--stream]

Modes as the official CosyVoice2/3: zero_shot (the LM sees the prompt text and prompt speech
tokens), cross_lingual (the LM sees no prompt speech; only the flow is conditioned on the prompt)
and instruct2 (the LM sees the instruction instead of the prompt text, and no prompt speech
tokens). What the LM sees per mode and family is the frontend's `lm_prompt` (CosyVoice3 adds its
system prompt, light_tts.frontend.frontend.CosyVoice3Prompts). The LM's tokens pass the family's
silent-token rule (token2wav.drop_long_silences; CosyVoice3 only) on the way to token2wav.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Iterator, Optional

import numpy as np
import torch

from light_tts.audio_out import SAMPLE_RATE, pcm16_bytes
from light_tts.frontend.audio import AudioError
from light_tts.frontend.frontend import Frontend
from light_tts.frontend.voice_cache import Voice
from light_tts.models.loading import ModelLoadError
from light_tts.models.pretrained import PretrainedModel, load_model
from light_tts.models.token2wav import StreamSchedule, Token2Wav, drop_long_silences, stream_chunks

MODES = ("zero_shot", "cross_lingual", "instruct2")


def synthesize_piece(model: PretrainedModel, voice: Voice, text_ids: list[int], *, mode: str = "zero_shot",
                     instruct_ids: Optional[list[int]] = None, lm_prompt: Optional[tuple] = None,
                     stream: bool = False, speed: float = 1.0, seed: Optional[int] = 0,
                     max_speech_tokens: Optional[int] = None, fixed_speech_tokens: Optional[int] = None,
                     greedy: bool = False) -> Iterator[np.ndarray]:
    """Audio chunks (float32, 24 kHz) for one normalised text piece.

    lm_prompt: (prompt text ids, prompt speech tokens) the LM sees, from Frontend.lm_prompt (either
    family). Without it they follow `mode` from the ids given (the voice's transcript and tokens /
    nothing / `instruct_ids`), which is each family's rule except CosyVoice3 cross_lingual (whose
    system prompt only the frontend adds)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if lm_prompt is None:
        lm_prompt = {"zero_shot": (voice.prompt_text_ids, voice.speech_tokens),
                     "cross_lingual": (None, None), "instruct2": (instruct_ids or [], None)}[mode]
    prompt_text, prompt_speech = lm_prompt
    tokens = model.llm.inference(text_ids, prompt_text, prompt_speech, seed=seed, greedy=greedy,
                                 max_new_tokens=max_speech_tokens, fixed_new_tokens=fixed_speech_tokens)
    tokens = drop_long_silences(tokens, model.llm.SILENT_TOKENS, model.llm.MAX_SILENT_RUN)
    t2w = Token2Wav(model.flow, model.hift, torch.from_numpy(voice.speech_tokens),
                    torch.from_numpy(voice.prompt_feat), torch.from_numpy(voice.embedding),
                    StreamSchedule(pre_lookahead_len=model.flow.pre_lookahead_len), seed=seed,
                    family=model.FAMILY.name)
    yield from stream_chunks(tokens, t2w, stream=stream, speed=speed)


def synthesize(model: PretrainedModel, frontend: Frontend, tts_text: str, voice: Voice, *,
               mode: str = "zero_shot", instruct_text: str = "", **kwargs) -> Iterator[np.ndarray]:
    """Normalise and split `tts_text`, then synthesise each piece in turn."""
    lm_prompt = frontend.lm_prompt(mode, voice, instruct_text=instruct_text, tts_text=tts_text)
    for piece in frontend.normalize(tts_text, split=True):
        yield from synthesize_piece(model, voice, frontend.tokenize(piece), mode=mode, lm_prompt=lm_prompt,
                                    **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Offline CosyVoice2 / CosyVoice3 synthesis (plain PyTorch reference path)")
    p.add_argument("--model_dir", required=True,
                   help="a CosyVoice2 or CosyVoice3 model directory, or a ModelScope id (iic/CosyVoice2-0.5B, "
                        "FunAudioLLM/Fun-CosyVoice3-0.5B-2512; downloading needs pip install "
                        "'light-tts[modelscope]')")
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
        p.error("--speed works only without --stream (as the official)")
    if not args.tts_text.strip():
        p.error("--tts_text is empty")
    # what would otherwise fail after the model is loaded (or after the whole synthesis)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out {args.out}: the directory {out_dir} does not exist")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")

    import soundfile as sf
    if args.device == "cpu":
        torch.set_flush_denormal(True)  # random and real weights produce subnormals: 2x slower CPU math
    t0 = time.perf_counter()
    try:
        model = load_model(args.model_dir, device=args.device, dtype=args.dtype)
        frontend = Frontend(model.model_dir)   # the local directory when --model_dir is a ModelScope id
        with open(args.prompt_wav, "rb") as f:
            voice = frontend.encode_voice(f.read(), args.prompt_text)
    except (ModelLoadError, AudioError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded {model.FAMILY.title} in {time.perf_counter() - t0:.2f} s; prompt: {len(voice.speech_tokens)} speech tokens")

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
