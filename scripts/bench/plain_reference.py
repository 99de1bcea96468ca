"""The plain-PyTorch reference pipeline (light_tts.synthesize: one request at a time, the official
design; either family, from the model directory) timed on the inputs scripts/bench/benchmark.py sends, so a GPU report can show it
beside the server in the same run.

    python scripts/bench/plain_reference.py --model_dir /tmp/lighttts-full --dtype bf16 --repeat 3

Per request: the LM (fixed --fixed_speech_tokens), flow and HiFT; streaming (official chunk
schedule) and not. The prompt is encoded once (frontend: audio -> speech tokens, speaker embedding,
features) and cached from the warm-up on, as the server caches it per voice.
Prints first-audio and total time (median of --repeat after one warm-up), RTF and audio-s/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from benchmark import PROMPT_TEXT, PROMPT_WAV, TEXTS  # noqa: E402
from light_tts.frontend.frontend import Frontend  # noqa: E402
from light_tts.models.pretrained import load_model  # noqa: E402
from light_tts.audio_out import SAMPLE_RATE  # noqa: E402
from light_tts.synthesize import synthesize  # noqa: E402


def one(model, frontend, prompt: bytes, prompt_text: str, text: str, stream: bool, tokens: int, seed: int) -> dict:
    t0 = time.perf_counter()
    voice = frontend.encode_voice(prompt, prompt_text)
    first, samples = None, 0
    for chunk in synthesize(model, frontend, text, voice, stream=stream, seed=seed, fixed_speech_tokens=tokens):
        if first is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
        samples += len(chunk)
    total = time.perf_counter() - t0
    return dict(first=first, total=total, audio=samples / SAMPLE_RATE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--fixed_speech_tokens", type=int, default=250)
    p.add_argument("--prompt_wav", default=PROMPT_WAV)
    p.add_argument("--prompt_text", default=PROMPT_TEXT)
    args = p.parse_args(argv)
    model = load_model(args.model_dir, device=args.device, dtype=args.dtype)
    frontend = Frontend(model.model_dir)
    prompt = open(args.prompt_wav, "rb").read()
    print(f"# plain reference pipeline ({type(model).__name__}, {args.device}, {args.dtype}), one request at a time, "
          f"{args.fixed_speech_tokens} speech tokens per request\n")
    print("| mode | requests | first audio p50 | total p50 | audio s | RTF | audio s/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for stream in (True, False):
        one(model, frontend, prompt, args.prompt_text, TEXTS[0], stream, args.fixed_speech_tokens, 0)   # warm-up
        runs = [one(model, frontend, prompt, args.prompt_text, TEXTS[i % len(TEXTS)], stream,
                    args.fixed_speech_tokens, i) for i in range(args.repeat)]
        first = statistics.median(r["first"] for r in runs)
        total = statistics.median(r["total"] for r in runs)
        audio = statistics.median(r["audio"] for r in runs)
        print(f"| {'stream' if stream else 'non-stream'} | {len(runs)} | {first * 1e3:.0f} ms | {total:.2f} s | "
              f"{audio:.2f} | {total / audio:.3f} | {sum(r['audio'] for r in runs) / sum(r['total'] for r in runs):.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
