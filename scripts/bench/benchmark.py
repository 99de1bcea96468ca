"""Load benchmark for a running LightTTS server (seed 001's client, grown up).

    python scripts/bench/benchmark.py --url http://127.0.0.1:8080 --concurrency 1 4 16 64 --requests 64 \
        --fixed_speech_tokens 250 [--stream both] [--payload multipart|json] [--json out.json]
    python scripts/bench/benchmark.py --repeat 3 [--prompt_wav F --prompt_text T]   # one request at a time

Per request: time to the first audio byte, total time, audio seconds, RTF. Per (mode, concurrency):
p50/p90/p99 of first audio and total, audio-seconds per wall-second, errors. A fixed prompt (the
fixture prompt_en_5s.wav, 5.0 s, espeak-ng) and fixed texts; `--fixed_speech_tokens N` asks the server for
exactly N speech tokens per request so random-weight runs compare (real weights: leave it 0).

--repeat N: no load levels; per mode N requests one after another (after --warmup), and a table of
the medians (first audio byte, total, audio, RTF): the latency of an idle server.

First-chunk breakdown: around each level the script reads the server's
lighttts_first_chunk_stage_seconds histogram (/metrics) and prints the mean time per stage of that
level's requests (encode_wait ... to_http: the stages between the marks each stage process stamps on
a request, light_tts.server.io_struct); it needs a server to itself during the run.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from light_tts.tools.client_util import WAV_HEADER_BYTES, parse_prometheus, pcm_seconds, percentile  # noqa: E402

# light_tts.server.http.metrics.FIRST_CHUNK_STAGES, written out (importing the server's metrics module
# would pull in its dependencies; tests/test_server.py checks they agree)
STAGES = ("encode_wait", "encode", "llm_wait", "prefill", "first_tokens", "decode_wait", "decode", "to_http")
# DESIGN section 7's workload: a ~5 s prompt (~125 speech tokens), so prompt + first hop align on
# whole 25-token chunks with no padding (a 3.3 s prompt of 82 tokens needs a 43-token first hop)
PROMPT_WAV = os.path.join(ROOT, "tests", "fixtures", "prompt_en_5s.wav")
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog, then runs back across the field."
TEXTS = [
    "LightTTS turns text into speech in the voice of a short recording.",
    "The weather today is clear, with a light breeze from the west.",
    "Please hold on while I look up the details of your order.",
    "Streaming audio starts playing before the whole sentence is ready.",
]


async def one(client: httpx.AsyncClient, args, prompt: bytes, i: int, stream: bool) -> dict:
    fields = {"tts_text": args.tts_text or TEXTS[i % len(TEXTS)], "prompt_text": args.prompt_text, "stream": stream,
              "seed": i}
    if args.fixed_speech_tokens:
        fields["fixed_speech_tokens"] = args.fixed_speech_tokens
    if args.payload == "json":
        kw = {"json": {**fields, "prompt_wav": base64.b64encode(prompt).decode()}}
    else:
        kw = {"data": {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()},
              "files": {"prompt_wav": ("prompt.wav", prompt, "audio/wav")}}
    t0 = time.perf_counter()
    first, size, status, err = None, 0, 0, ""
    arrivals = []   # (seconds since the request, bytes) per piece of the body
    try:
        async with client.stream("POST", args.url + "/inference_zero_shot", **kw) as r:
            status = r.status_code
            if status != 200:
                err = (await r.aread()).decode(errors="replace")[:200]
            else:
                async for chunk in r.aiter_raw():
                    if chunk and first is None:
                        first = time.perf_counter() - t0
                    size += len(chunk)
                    if chunk:
                        arrivals.append((time.perf_counter() - t0, len(chunk)))
    except httpx.HTTPError as e:
        err = f"{type(e).__name__}: {e}"
    total = time.perf_counter() - t0
    audio = pcm_seconds(max(0, size - (0 if stream else WAV_HEADER_BYTES)))
    ok = status == 200 and audio > 0
    return {"ok": ok, "status": status, "error": err, "first": first, "total": total, "audio": audio,
            "rtf": total / audio if audio else None, "arrivals": arrivals}


def hops(arrivals: list, gap_s: float = 0.02) -> list[tuple[float, float]]:
    """A streamed body's pieces grouped into the server's chunks (pieces closer than gap_s are one
    chunk): (arrival seconds, audio seconds) per chunk."""
    out: list = []
    for t, n in arrivals:
        if out and t - out[-1][0] < gap_s:
            out[-1] = (t, out[-1][1] + pcm_seconds(n))
        else:
            out.append((t, pcm_seconds(n)))
    return out


def hop_table(result: dict) -> str:
    """One streamed request's chunks: when each arrived, its gap to the one before, its audio."""
    lines = ["chunk | arrived ms | gap ms | audio s | audio so far s", "--- | ---: | ---: | ---: | ---:"]
    prev, total = 0.0, 0.0
    for i, (t, a) in enumerate(hops(result["arrivals"]), 1):
        total += a
        lines.append(f"{i} | {t * 1e3:.0f} | {(t - prev) * 1e3:.0f} | {a:.2f} | {total:.2f}")
        prev = t
    return "\n".join(lines)


async def run_level(args, prompt: bytes, concurrency: int, stream: bool) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        for w in range(args.warmup):
            await one(client, args, prompt, w, stream)
        sem = asyncio.Semaphore(concurrency)

        async def bounded(i):
            async with sem:
                return await one(client, args, prompt, i, stream)
        before = await stage_totals(client, args.url)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
        after = await stage_totals(client, args.url)
    good = [r for r in results if r["ok"]]
    firsts = [r["first"] for r in good if r["first"] is not None]
    totals = [r["total"] for r in good]
    return {"mode": "stream" if stream else "non-stream", "concurrency": concurrency, "requests": len(results),
            "errors": len(results) - len(good), "wall": wall,
            "first_p50": percentile(firsts, .5), "first_p90": percentile(firsts, .9),
            "first_p99": percentile(firsts, .99), "total_p50": percentile(totals, .5),
            "total_p99": percentile(totals, .99),
            "rtf_p50": percentile([r["rtf"] for r in good if r["rtf"]], .5),
            "audio_per_s": sum(r["audio"] for r in good) / wall,
            "error_samples": sorted({f"{r['status']} {r['error']}" for r in results if not r["ok"]})[:3],
            "stages_ms": stage_means(before, after), "results": results}


async def stage_totals(client: httpx.AsyncClient, url: str) -> dict:
    """{stage: [sum seconds, count]} of the server's first-chunk breakdown histogram ({} if unreadable)."""
    try:
        text = (await client.get(url + "/metrics", timeout=10)).text
    except httpx.HTTPError:
        return {}
    metrics = parse_prometheus(text)
    out: dict = {}
    for i, kind in enumerate(("sum", "count")):
        for labels, value in metrics.get("lighttts_first_chunk_stage_seconds_" + kind, []):
            out.setdefault(labels.get("stage"), [0.0, 0.0])[i] += value
    return out


def stage_means(before: dict, after: dict) -> dict:
    """Mean milliseconds per stage over the requests between the two readings."""
    means = {}
    for stage, (total, count) in after.items():
        t0, c0 = before.get(stage, (0.0, 0.0))
        if count > c0:
            means[stage] = (total - t0) / (count - c0) * 1e3
    return means


def breakdown(rows: list[dict]) -> str:
    """Mean first-chunk time per stage (ms) for every level that has the server's breakdown."""
    stages = [s for s in STAGES if any(s in r["stages_ms"] for r in rows)]
    if not stages:
        return ""
    out = ["| mode | conc | " + " | ".join(stages) + " | sum of means | first p50 (client) |",
           "| --- | --- | " + " | ".join("---:" for _ in stages) + " | ---: | ---: |"]
    for r in rows:
        if r["stages_ms"]:
            vals = [r["stages_ms"].get(s, float("nan")) for s in stages]
            out.append(f"| {r['mode']} | {r['concurrency']} | " + " | ".join(f"{v:.1f}" for v in vals) +
                       f" | {sum(v for v in vals if v == v):.1f} | {r['first_p50'] * 1e3:.1f} |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = ["| mode | conc | req | err | first p50 | first p90 | first p99 | total p50 | total p99 | RTF p50 | audio s/s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ms = lambda v: f"{v * 1e3:.0f} ms" if v == v else "-"
    for r in rows:
        out.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {ms(r['first_p50'])} | "
                   f"{ms(r['first_p90'])} | {ms(r['first_p99'])} | {r['total_p50']:.2f} s | {r['total_p99']:.2f} s | "
                   f"{r['rtf_p50']:.3f} | {r['audio_per_s']:.1f} |")
    return "\n".join(out)


def medians_table(rows: list[dict]) -> str:
    """--repeat: one line per mode, the medians of its one-at-a-time requests."""
    out = ["| mode | first audio byte (median) | total | audio | RTF |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        good = [x for x in r["results"] if x["ok"]]
        med = lambda k: statistics.median(x[k] for x in good) if good else float("nan")  # noqa: E731
        out.append(f"| {'streaming' if r['mode'] == 'stream' else 'non-streaming'} | {med('first') * 1e3:.0f} ms | "
                   f"{med('total'):.2f} s | {med('audio'):.2f} s | {med('rtf'):.3f} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=None, help="per level (default: max(8, 2 x concurrency))")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--stream", choices=("yes", "no", "both"), default="both")
    p.add_argument("--payload", choices=("multipart", "json"), default="multipart")
    p.add_argument("--prompt_wav", default=PROMPT_WAV)
    p.add_argument("--prompt_text", default=PROMPT_TEXT)
    p.add_argument("--tts_text", help="say this in every request (default: the four fixed texts in turn)")
    p.add_argument("--repeat", type=int, default=0,
                   help="one request at a time: N per mode after --warmup, a table of medians (no load levels)")
    p.add_argument("--fixed_speech_tokens", type=int, default=250, help="0: let the model decide")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="write every request's numbers here")
    p.add_argument("--hops", action="store_true",
                   help="with --repeat and streaming: print each request's chunks (arrival, gap, audio)")
    args = p.parse_args()
    if args.repeat < 0:
        p.error("--repeat must be >= 0")
    prompt = open(args.prompt_wav, "rb").read()
    modes = {"yes": [True], "no": [False], "both": [True, False]}[args.stream]
    levels = [1] if args.repeat else args.concurrency
    rows = []
    requests_arg = args.repeat or args.requests
    for stream in modes:
        for c in levels:
            args.requests = requests_arg or max(8, 2 * c)
            row = asyncio.run(run_level(args, prompt, c, stream))
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            for e in row["error_samples"]:
                print(f"  error: {e}", flush=True)
    if args.hops:
        for row in rows:
            for k, r in enumerate(row["results"]):
                if row["mode"] == "stream" and r["ok"]:
                    print(f"\nrequest {k + 1} of {row['requests']}, chunks as they arrived:\n{hop_table(r)}")
    print()
    print(medians_table(rows) if args.repeat else table(rows))
    parts = breakdown(rows)
    if parts:
        print("\nfirst-chunk breakdown, mean ms per stage (server marks; the client's first byte adds HTTP):\n")
        print(parts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
