"""Time one non-streaming and one streaming zero-shot request against a running server.

    python scripts/request_timing.py --url http://127.0.0.1:8080 --prompt_wav tests/fixtures/prompt_en.wav \
        --prompt_text "The quick brown fox jumps over the lazy dog." [--fixed_speech_tokens 250] [--repeat 3]

Prints, per request: time to the first audio byte, total time, audio seconds and RTF.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import httpx


def one(url: str, prompt: bytes, args, stream: bool) -> dict:
    data = {"prompt_text": args.prompt_text, "tts_text": args.tts_text, "stream": str(stream).lower()}
    if args.fixed_speech_tokens:
        data["fixed_speech_tokens"] = str(args.fixed_speech_tokens)
    t0 = time.perf_counter()
    first = None
    size = 0
    with httpx.stream("POST", url + "/inference_zero_shot", data=data, timeout=600,
                      files={"prompt_wav": ("prompt.wav", prompt, "audio/wav")}) as r:
        if r.status_code != 200:
            r.read()
            raise SystemExit(f"HTTP {r.status_code}: {r.text}")
        for chunk in r.iter_raw():
            if chunk and first is None:
                first = time.perf_counter() - t0
            size += len(chunk)
    total = time.perf_counter() - t0
    pcm = size - (0 if stream else 44)
    audio = pcm / 2 / 24000
    return {"first": first, "total": total, "audio": audio, "rtf": total / audio if audio else float("nan")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--prompt_wav", required=True)
    p.add_argument("--prompt_text", required=True)
    p.add_argument("--tts_text", default="LightTTS turns text into speech in the voice of a short recording.")
    p.add_argument("--fixed_speech_tokens", type=int, default=250)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    prompt = open(args.prompt_wav, "rb").read()
    one(args.url, prompt, args, stream=True)  # warm-up (first-call allocations, caches)
    print("| mode | first audio byte (median) | total | audio | RTF |\n| --- | --- | --- | --- | --- |")
    for stream in (False, True):
        runs = [one(args.url, prompt, args, stream) for _ in range(args.repeat)]
        med = lambda k: statistics.median(r[k] for r in runs)
        print(f"| {'streaming' if stream else 'non-streaming'} | {med('first') * 1e3:.0f} ms | {med('total'):.2f} s "
              f"| {med('audio'):.2f} s | {med('rtf'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
