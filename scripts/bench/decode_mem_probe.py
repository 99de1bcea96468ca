"""Decode-process memory probe: the soak's decode traffic in one process, RSS printed as it goes.

    python scripts/bench/decode_mem_probe.py --model_dir /path/to/tiny --requests 600 --every 50 --malloc_stats
    LRU_CACHE_CAPACITY=1024 ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 \
        python scripts/bench/decode_mem_probe.py --model_dir /path/to/tiny --requests 600 --every 50 --malloc_stats
    (the second: the libraries' default cache sizes, as before bound_cpu_caches; docs/reliability.md "Soak")

Runs the decode server's own loop (light_tts.server.decode.process.DecodeServer.step: messages,
one batched engine call, finished requests) with the sockets replaced by lists, set up as
run_decode_process sets up a CPU decode process (bound_cpu_caches, threads, flush-denormal):
`--concurrency` requests are in flight at once, each with `--min_tokens`..`--max_tokens` speech
tokens that arrive 1 to 8 per loop iteration (as the LLM sends them), streaming or not, some
aborted after their first chunk, all on one prompt (as the soak). Every `--every` finished
requests it prints wall and CPU seconds, VmRSS and its peak; with --malloc_stats also glibc's
mallinfo2 (heap bytes in use vs. free but held), which splits a growth into "live allocations" and
"allocator keeps freed memory". At the end: a SHA-256 over every audio chunk sent (runs that compute
the same audio print the same digest).

Knobs for bisecting: --only flow|hift (fake the other half of the engine), --fixed (every request
alike), --no_mkldnn, --mmap_threshold, --trim_every, and the environment (ONEDNN_PRIMITIVE_CACHE_CAPACITY,
LRU_CACHE_CAPACITY, MALLOC_*; the library defaults, as before the fix: both capacities 1024).
CPU only; keep it small on shared machines (about 4 requests/s on one core with the tiny model).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def rss_mib(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> str:
    """glibc's heap (all arenas): bytes from brk/arenas, in use, free; bytes in mmapped chunks."""
    fn = ctypes.CDLL(None).mallinfo2
    fn.restype = MallInfo2
    m = fn()
    mib = lambda b: b / 2**20
    return (f"heap {mib(m.arena):.0f} MiB (in use {mib(m.uordblks):.0f}, free {mib(m.fordblks):.0f}), "
            f"mmap {mib(m.hblkhd):.0f} MiB in {m.hblks}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--min_tokens", type=int, default=10)
    p.add_argument("--max_tokens", type=int, default=80)
    p.add_argument("--prompt_tokens", type=int, default=82, help="the soak's prompt: 3.3 s of audio")
    p.add_argument("--stream_share", type=float, default=0.6)
    p.add_argument("--abort_share", type=float, default=0.2, help="of the streaming requests")
    p.add_argument("--fixed", action="store_true", help="every request alike: max_tokens, streaming, no abort")
    p.add_argument("--only", choices=("flow", "hift"), help="run one half of the engine, fake the other")
    p.add_argument("--trim_every", type=int, default=0, help="malloc_trim(0) every N finished requests (0: never); "
                   "RSS lines then fall right after a trim when --every is a multiple of N")
    p.add_argument("--no_mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    p.add_argument("--mmap_threshold", type=int, default=0, help="mallopt(M_MMAP_THRESHOLD, N) at start (0: glibc's)")
    p.add_argument("--malloc_stats", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the decode process's choice)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from light_tts.server.decode import process as dp
    caches = dp.bound_cpu_caches()   # as run_decode_process, before torch runs a convolution
    import numpy as np
    import torch
    from light_tts.server.decode.engine import build_engine
    from light_tts.server.io_struct import (AbortReq, AudioOutput, DecodeStartReq, ErrorOutput,
                                            SpeechTokensBatchOutput)

    if a.mmap_threshold:
        ctypes.CDLL(None).mallopt(-3, a.mmap_threshold)   # M_MMAP_THRESHOLD
    torch.set_num_threads(a.threads or dp.cpu_threads())
    torch.set_flush_denormal(True)
    if a.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    flow, hift = dp.load_decode_model(a.model_dir, "cpu", "fp32")
    engine = build_engine(flow, hift, "cpu", cuda_graph=False, warmup=False)
    if a.only == "flow":
        class NoHift:
            dtype = torch.float32

            def __call__(self, mels, caches, gens):
                return [(torch.zeros(1, m.size(2) * 480), torch.zeros(1, 1, m.size(2) * 480)) for m in mels]
        engine.hift = NoHift()
    elif a.only == "hift":
        def no_flow(rows):   # the mel the flow would give: 2 frames per new token
            return [torch.randn(1, 80, 2 * (c.tokens.numel() - (0 if c.finalize else flow.pre_lookahead_len)))
                    for _, c in rows]
        engine.flow = no_flow

    inbox: list = []
    digest = hashlib.sha256()   # of every chunk sent, in order: equal runs give equal audio
    done, first_chunk = set(), set()
    dp.drain = lambda sock: [inbox.pop(0) for _ in range(len(inbox))]

    class Probe(dp.DecodeServer):
        def init_sockets(self, ctx, addr):
            self.recv_from_peers = None

        def reply(self, reply_to, msg):
            if isinstance(msg, AudioOutput):
                digest.update(msg.rid.encode() + msg.pcm)
            if isinstance(msg, ErrorOutput) or (isinstance(msg, AudioOutput) and msg.finished):
                done.add(msg.rid)
            elif isinstance(msg, AudioOutput):
                first_chunk.add(msg.rid)

        def publish_stats(self):
            pass

    class NoEndpoints:
        def decode(self, i):
            return ""

    server = Probe(NoEndpoints(), 0, flow, hift, engine=engine, max_batch_size=16)
    libc = ctypes.CDLL(None)
    trim_ms: list[float] = []

    rng = random.Random(a.seed)
    g = np.random.default_rng(a.seed)
    prompt_tokens = g.integers(0, flow.vocab_size, a.prompt_tokens).astype(np.int32)
    prompt_feat = g.standard_normal((2 * a.prompt_tokens, 80)).astype(np.float32)
    emb = g.standard_normal(192).astype(np.float32)

    live: dict[str, dict] = {}
    started = finished = 0
    t0, c0 = time.perf_counter(), time.process_time()
    print(f"caches: {caches}; torch threads {torch.get_num_threads()}", flush=True)
    print(f"start: RSS {rss_mib():.1f} MiB" + (f"; {mallinfo()}" if a.malloc_stats else ""), flush=True)
    while finished < a.requests:
        while len(live) < a.concurrency and started < a.requests:
            rid = f"r{started}"
            started += 1
            n = a.max_tokens if a.fixed else rng.randint(a.min_tokens, a.max_tokens)
            stream = True if a.fixed else rng.random() < a.stream_share
            abort = False if a.fixed else (stream and rng.random() < a.abort_share)
            live[rid] = {"tokens": g.integers(0, flow.vocab_size, n).tolist(), "sent": 0, "abort": abort}
            inbox.append(DecodeStartReq(rid=rid, reply_to="x", prompt_speech_tokens=prompt_tokens,
                                        prompt_feat=prompt_feat, embedding=emb, stream=stream,
                                        seed=rng.randint(0, 2**31)))
        batch = SpeechTokensBatchOutput()   # the LLM: a few tokens per request per step, one message
        for rid, r in list(live.items()):
            if r["sent"] < len(r["tokens"]):
                piece = r["tokens"][r["sent"]:r["sent"] + rng.randint(1, 8)]
                r["sent"] += len(piece)
                last = r["sent"] >= len(r["tokens"])
                batch.rids.append(rid)
                batch.tokens.append(piece)
                batch.pieces.append(0)
                batch.piece_done.append(last)
                batch.finished.append(last)
            if r["abort"] and rid in first_chunk:   # the client hangs up after its first chunk
                inbox.append(AbortReq(rid=rid))
                done.add(rid)
        if batch.rids:
            inbox.append(batch)
        server.step(block=False)
        for rid in [r for r in live if r in done]:
            del live[rid]
            done.discard(rid)
            first_chunk.discard(rid)
            finished += 1
            if a.trim_every and finished % a.trim_every == 0:
                t = time.perf_counter()
                libc.malloc_trim(0)
                trim_ms.append(1e3 * (time.perf_counter() - t))
            if finished % a.every == 0:
                line = (f"{finished:6d} req {time.perf_counter() - t0:7.1f} s (cpu {time.process_time() - c0:6.1f} s)"
                        f"  RSS {rss_mib():7.1f} MiB (peak {rss_mib('VmHWM'):7.1f})")
                print(line + ("  " + mallinfo() if a.malloc_stats else ""), flush=True)
    server.step(block=False)   # the aborts still in the inbox
    assert not server.states, list(server.states)
    print(f"audio sha256 {digest.hexdigest()} ({server.chunks} chunks)")
    print(f"end: RSS {rss_mib():.1f} MiB, errors {server.errors}, "
          f"batch sizes {dict(sorted(server.batch_sizes.items()))}")
    if trim_ms:
        print(f"malloc_trim: {len(trim_ms)} calls, mean {sum(trim_ms) / len(trim_ms):.2f} ms, "
              f"max {max(trim_ms):.2f} ms")
    if a.malloc_stats:
        libc.malloc_trim(0)
        print(f"after malloc_trim(0): RSS {rss_mib():.1f} MiB; {mallinfo()}")


if __name__ == "__main__":
    main()
