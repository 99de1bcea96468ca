"""Streamed sentences through the decode engine, chunk by chunk, with and without the prompt cache's
stream part (light_tts/server/decode/prompt_cache.py), in one run.

    python scripts/bench/bench_stream.py --model_dir /tmp/lighttts-full --make full --dtype bf16

Modes: "plain" (no prompt cache: the server's default), "voice" (voices cached,
the server's --decode_prompt_cache_gb), "voice+stream" (voices and each stream's earlier chunks
cached: --decode_stream_cache).
1. Hops: one sentence of --long_tokens speech tokens (1500: 60 s of audio) streamed alone on the
   official schedule; each chunk's engine time (flow + HiFT, synchronised), in the second of two
   runs (the first captures the graphs a start would warm up).
2. Throughput: B sentences of --tokens tokens (250: 10 s) per batch size, every chunk of every
   sentence batched as the decode process batches them when all are ready; engine seconds and
   audio seconds per second (second run of two).
Every mode's audio is compared with the plain mode's (relative L2 over each sentence; exit 1 past
the dtype's tolerance), and the cache's counters are printed.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from light_tts.tools.bench_args import add_model_args, ensure_model  # noqa: E402
from light_tts.server.decode.engine import build_engine  # noqa: E402
from light_tts.server.decode.process import load_decode_model  # noqa: E402
from light_tts.models.token2wav import StreamingDecoder, StreamSchedule, Token2Wav  # noqa: E402

MODES = {"plain": (0.0, False), "voice": (None, False), "voice+stream": (None, True)}
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 2e-2}   # as bench_decode.py: rounding through 10 Euler steps


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode(engine, sentences, flow, hift, schedule, prompt):
    """Stream every (tokens, seed) sentence in lockstep: (audio per sentence, [(rows, seconds)] per
    engine call)."""
    pt, pf, emb = prompt
    decoders = []
    for tokens, seed in sentences:
        d = StreamingDecoder(Token2Wav(flow, hift, pt, pf, emb, schedule, seed=seed), stream=True)
        d.feed(tokens)
        d.end()
        decoders.append(d)
    audio = [[] for _ in decoders]
    calls = []
    while any(d.ready for d in decoders):
        rows, owners = [], []
        for i, d in enumerate(decoders):
            if d.ready:
                rows.append((d.t2w, d.next_chunk()))
                owners.append(i)
        sync()
        t = time.perf_counter()
        outs = engine.run(rows)
        sync()
        calls.append((len(rows), time.perf_counter() - t))
        for i, out in zip(owners, outs):
            if isinstance(out, Exception):
                raise out
            audio[i].append(out)
    return [np.concatenate(a) for a in audio], calls


def rel_l2(got, want) -> float:
    n = min(len(got), len(want))
    return float(np.linalg.norm(got[:n] - want[:n]) / max(np.linalg.norm(want[:n]), 1e-12))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--prompt_tokens", type=int, default=125, help="5 s prompt")
    p.add_argument("--long_tokens", type=int, default=1500)
    p.add_argument("--tokens", type=int, default=250)
    p.add_argument("--batch_sizes", default="16,64")
    p.add_argument("--cache_gb", type=float, default=40.0, help="prompt cache of the cached modes")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, plain first (the reference)")
    args = p.parse_args()
    ensure_model(args)
    flow, hift = load_decode_model(args.model_dir, args.device, args.dtype)
    g = torch.Generator().manual_seed(0)
    n = args.prompt_tokens
    prompt = (torch.randint(0, flow.vocab_size, (n,), generator=g), torch.randn(2 * n, flow.output_size, generator=g)
              * 0.5, torch.randn(192, generator=g))
    schedule = StreamSchedule(pre_lookahead_len=flow.pre_lookahead_len)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    rnd = lambda count, seed: torch.randint(0, flow.vocab_size, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    long = [(rnd(args.long_tokens, 1), 0)]
    print(f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, dtype {args.dtype}, "
          f"prompt {n} tokens, cache {args.cache_gb} GB")
    reference: dict = {}
    worst = 0.0
    modes = args.modes.split(",")
    if modes[0] != "plain" or not set(modes) <= set(MODES):
        p.error(f"--modes: plain first, then any of {', '.join(MODES)}")
    for mode in modes:
        gb, streams = MODES[mode]
        gb = args.cache_gb if gb is None else gb
        t0 = time.perf_counter()
        engine = build_engine(flow, hift, args.device, data_type=args.dtype, max_batch_size=max(batch_sizes + [1]),
                              warmup=False, prompt_cache_gb=gb, stream_cache=streams)
        print(f"\n== {mode} (engine built in {time.perf_counter() - t0:.1f} s)")
        # 1. one long sentence, alone
        for _ in range(2):
            audio, calls = decode(engine, long, flow, hift, schedule, prompt)
        secs = [s * 1e3 for _, s in calls]
        print(f"hops of a {args.long_tokens}-token sentence ({len(audio[0]) / 24000:.1f} s of audio), ms per chunk: "
              + " ".join(f"{s:.0f}" for s in secs))
        print(f"  streaming chunks: min {min(secs[:-1]):.0f}, max {max(secs[:-1]):.0f}; final chunk {secs[-1]:.0f}; "
              f"sum {sum(secs):.0f} ms")
        if mode != "plain":
            err = rel_l2(audio[0], reference["plain"]["long"])
            worst = max(worst, err)
            print(f"  audio vs plain: rel L2 {err:.2e}")
        reference.setdefault(mode, {})["long"] = audio[0]
        # 2. throughput
        for b in batch_sizes:
            sentences = [(rnd(args.tokens, 100 + i), i) for i in range(b)]
            for _ in range(2):
                audio, calls = decode(engine, sentences, flow, hift, schedule, prompt)
            total = sum(s for _, s in calls)
            seconds = sum(len(a) for a in audio) / 24000
            print(f"batch {b}: {len(calls)} engine calls, {total * 1e3:.0f} ms, {seconds / total:.1f} audio-s/s "
                  f"(calls ms: {' '.join(f'{s * 1e3:.0f}' for _, s in calls)})")
            if mode != "plain":
                err = max(rel_l2(a, w) for a, w in zip(audio, reference["plain"][b]))
                worst = max(worst, err)
                print(f"  audio vs plain: worst rel L2 {err:.2e}")
            reference[mode][b] = audio
        cache = engine.flow.prompt_cache
        if cache is not None:
            print(f"  cache: voices {len(cache.entries)}, streams left {len(cache.streams)}, stream frames reused "
                  f"{cache.stream_frames_reused}, moves {cache.stream_moves}, fallbacks {cache.stream_fallbacks}")
        if torch.cuda.is_available():
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
        del engine, cache
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    tol = TOLERANCE[args.dtype]
    print(f"\nworst rel L2 vs plain: {worst:.2e} (tolerance {tol:g}): {'ok' if worst <= tol else 'FAILED'}")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
