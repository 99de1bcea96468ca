"""What a decode process's first request pays that later ones do not (the cold first request of the
CosyVoice3 server runs: ~190 ms of decode instead of ~75, docs/benchmarks.md).

    python scripts/bench/first_use_decode.py --model_dir /tmp/lighttts-full-cv3 --dtype bf16

Builds the engine as the decode process does (build_engine, its warm-up, the prompt and stream
cache; batch 1 only, so the warm-up is short), then for prompts of several lengths (each gives the
first chunk a window length of its own) times one first streaming chunk through the engine three
times: A a new voice at a new length, B another new voice at the same length, C B's voice again
(its prompt frames cached). Then the vocoder's pieces on the same GPU at mel lengths no call has
used yet, each twice: the F0 predictor (float64), the excitation source, the decode network.
Either family; the vocoder pieces are CosyVoice3's (skipped for CosyVoice2).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from light_tts.models.token2wav import Chunk, StreamSchedule, Token2Wav, vocoder_family  # noqa: E402
from light_tts.server.decode.engine import build_engine  # noqa: E402
from light_tts.server.decode.process import load_decode_model  # noqa: E402


def timed_ms(fn, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--prompt_tokens", default="125,113,131,142", help="one first chunk per prompt length")
    p.add_argument("--mel_lengths", default="61,67,73", help="vocoder piece lengths, frames (not used before)")
    p.add_argument("--device", default="cuda", help="cuda (what it is for) or cpu (a smoke test of the script)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    flow, hift = load_decode_model(args.model_dir, str(device), args.dtype if device.type == "cuda" else "fp32")
    engine = build_engine(flow, hift, str(device), data_type=args.dtype, max_batch_size=1, prompt_cache_gb=2.0,
                          stream_cache=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {next(flow.parameters()).dtype}, "
          f"{vocoder_family(hift)}; engine built and warmed in {time.perf_counter() - t0:.0f} s\n")
    schedule = StreamSchedule(pre_lookahead_len=flow.pre_lookahead_len)
    g = torch.Generator().manual_seed(0)

    def voice(n: int):
        return (torch.randint(0, flow.vocab_size, (n,), generator=g), torch.randn(2 * n, 80, generator=g) * 0.5,
                torch.randn(192, generator=g))

    print("| prompt tokens | first hop tokens | A new voice, new length ms | B new voice, same length ms | "
          "C B's voice again ms |\n| ---: | ---: | ---: | ---: | ---: |")
    with torch.inference_mode():
        for n in (int(x) for x in args.prompt_tokens.split(",")):
            hop = schedule.first_hop(n)
            tokens = torch.randint(0, flow.vocab_size, (hop + flow.pre_lookahead_len,), generator=g)
            chunk = Chunk(tokens, 0, finalize=False, streaming=True)
            a, b = voice(n), voice(n)
            row = []
            for v in (a, b, b):
                t2w = Token2Wav(flow, hift, *v, schedule, seed=0)
                row.append(timed_ms(lambda: engine.run([(t2w, chunk)]), device))
            print(f"| {n} | {hop} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} |", flush=True)
        if vocoder_family(hift) != "cosyvoice3":
            return 0
        print("\n| mel frames | F0 predictor cold / warm ms | source cold / warm ms | decode network cold / warm ms |"
              "\n| ---: | ---: | ---: | ---: |")
        dtype = next(hift.parameters()).dtype
        for frames in (int(x) for x in args.mel_lengths.split(",")):
            mel = torch.randn(1, 80, frames, generator=g).to(device, dtype)
            f0_ms = [timed_ms(lambda: hift.f0_predictor(mel.double(), finalize=False), device) for _ in range(2)]
            f0 = hift.f0_predictor(mel.double(), finalize=False).to(mel.dtype)
            src_ms = [timed_ms(lambda: hift.m_source(f0), device) for _ in range(2)]
            source = hift.m_source(f0)
            cut = mel[:, :, :frames - hift.f0_predictor.lookahead]
            dec_ms = [timed_ms(lambda: hift.decode(cut, source, False), device) for _ in range(2)]
            print(f"| {frames} | {f0_ms[0]:.1f} / {f0_ms[1]:.1f} | {src_ms[0]:.1f} / {src_ms[1]:.1f} | "
                  f"{dec_ms[0]:.1f} / {dec_ms[1]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
