"""Soak test: mixed traffic against one LightTTS server for a bounded time, then check nothing leaked.

    python scripts/soak.py --url http://127.0.0.1:8080 --minutes 10 --concurrency 8
    python scripts/soak.py --model_dir /path/to/tiny --minutes 1 --concurrency 4   # starts its own server

Traffic (each worker thread picks at random, seeded): streaming requests read to the end,
non-streaming requests (multipart and JSON/base64), streaming requests the client abandons after
the first chunk, and bad requests with a known answer (400/404/405/415; each class and the status
codes it got are tabled at the end). Every request asks for
`fixed_speech_tokens`, so the audio length of a success is known exactly (1920 bytes per token).

Checks at the end (exit status 1 if any fails):
  - no lost or hung request: every request got its expected class of answer within --request_deadline
  - after --settle seconds: lighttts_llm_kv_used, lighttts_llm_running, lighttts_decode_active all 0
  - RSS of every server process (VmRSS, sampled at 20% of the run and at the end) grew by at most
    --rss_growth_pct percent or --rss_growth_mb MiB, whichever is larger
  - GPU memory used (nvidia-smi, if present) grew by at most --gpu_growth_mb MiB, and each GPU stage's
    live tensors (lighttts_gpu_memory_bytes{kind="allocated"}, sampled every 30 s under load) by at
    most --gpu_live_growth_mb MiB, the lowest of the last third of the samples vs. of the first

Loopback only: --url must name 127.0.0.0/8, localhost or ::1. Bounded by --minutes and --max_requests.
"""
from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from urllib.parse import urlparse

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from light_tts.audio_out import SAMPLE_RATE  # noqa: E402
from light_tts.tools.client_util import (WAV_HEADER_BYTES, ServerProcess, api_server_cmd, free_port,  # noqa: E402
                                         metric_values, parse_prometheus, process_table, server_env)

PROMPT_WAV = os.path.join(ROOT, "tests", "fixtures", "prompt_en.wav")
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog."
TTS_TEXT = "Soak test sentence."
BYTES_PER_TOKEN = 2 * SAMPLE_RATE // 25  # int16 samples; 25 speech tokens per second of audio
KINDS = ("stream", "nonstream", "json", "abort", "bad")


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server on this machine (loopback only)")
    src.add_argument("--model_dir", help="start a server on this model (CPU unless GPUs are visible) and stop it after")
    p.add_argument("--server_src", default=ROOT,
                   help="the checkout --model_dir runs the server from (its cwd, first on PYTHONPATH)")
    p.add_argument("--server_args", default="--max_total_token_num 8192 --max_req_total_len 2048 --batch_max_tokens 2048",
                   help="extra api_server flags when --model_dir starts the server")
    p.add_argument("--minutes", type=float, default=1.0, help="how long to send traffic")
    p.add_argument("--max_requests", type=int, default=100000, help="stop after this many requests even if time is left")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--min_tokens", type=int, default=10, help="fixed_speech_tokens per request: lowest")
    p.add_argument("--max_tokens", type=int, default=80, help="fixed_speech_tokens per request: highest")
    p.add_argument("--mix", default="stream=3,nonstream=3,json=1,abort=2,bad=1", help="relative weights of request kinds")
    p.add_argument("--request_deadline", type=float, default=120.0, help="seconds one request may take before it counts as hung")
    p.add_argument("--settle", type=float, default=10.0, help="seconds allowed for the pool to drain after traffic stops")
    p.add_argument("--rss_growth_pct", type=float, default=25.0)
    p.add_argument("--rss_growth_mb", type=float, default=200.0)
    p.add_argument("--gpu_growth_mb", type=float, default=200.0)
    p.add_argument("--gpu_live_growth_mb", type=float, default=100.0,
                   help="most growth of a GPU stage's live tensors (PyTorch's allocated memory, from /metrics)")
    p.add_argument("--api_key", default=os.environ.get("LIGHTTTS_API_KEY"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt_wav", default=PROMPT_WAV)
    p.add_argument("--prompt_text", default=PROMPT_TEXT)
    a = p.parse_args(argv)
    if a.url and not is_loopback(a.url):
        p.error(f"--url {a.url}: soak runs against this machine only (127.0.0.0/8, localhost or ::1)")
    if a.minutes <= 0 or a.minutes > 24 * 60 or a.concurrency < 1 or a.max_requests < 1:
        p.error("--minutes must be in (0, 1440], --concurrency and --max_requests >= 1")
    if not 1 <= a.min_tokens <= a.max_tokens:
        p.error("need 1 <= --min_tokens <= --max_tokens")
    try:
        a.weights = {k: float(v) for k, v in (item.split("=") for item in a.mix.split(","))}
    except ValueError:
        p.error(f"--mix {a.mix!r}: expected kind=weight,... with kinds {', '.join(KINDS)}")
    if set(a.weights) - set(KINDS) or sum(a.weights.values()) <= 0:
        p.error(f"--mix {a.mix!r}: kinds are {', '.join(KINDS)}")
    return a


# ---- the server's processes and memory -------------------------------------------------------------

def server_processes(session: int | None, port: int) -> dict[int, str]:
    """{pid: name} of the server: the session we started, else the processes of the instance on
    `port` (stage titles end in @port; the launcher's command line names --port), not another
    server's on the same machine."""
    out = {}
    for pid, fields, argv in process_table():
        title, cmd = argv[0], " ".join(argv)
        if session is not None:
            mine = int(fields[3]) == session
        else:
            mine = (title.startswith("lighttts::") and title.endswith(f"@{port}")) or \
                ("light_tts.server.api_server" in cmd and re.search(rf"--port[= ]{port}\b", cmd) is not None)
        if mine and pid != os.getpid():
            out[pid] = title if title.startswith("lighttts::") else ("api_server" if "api_server" in cmd else
                                                                      os.path.basename(title) or "?")
    return out


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    except OSError:  # the process is gone
        return None
    return int(m.group(1)) / 1024 if m else None


def server_gauges(url: str, headers: dict) -> tuple[str, dict]:
    """A line for the log: the decode stages' CUDA graphs captured after the warm-up (each may hold
    more GPU memory), and per GPU stage what PyTorch's allocator holds, live tensors / reserved from
    the driver, MiB; and the live tensors' MiB per stage ({} without a GPU or /metrics)."""
    try:
        metrics = parse_prometheus(httpx.get(url + "/metrics", headers=headers, timeout=10).text)
    except httpx.HTTPError as e:
        return f"? ({type(e).__name__})", {}
    values = metric_values(metrics, "lighttts_decode_graph_captures_while_serving_total")
    line = "decode graphs captured while serving: " + ("-" if not values else str(int(sum(values))))
    held: dict[str, dict[str, float]] = defaultdict(dict)
    for labels, value in metrics.get("lighttts_gpu_memory_bytes", []):
        held[labels.get("stage", "?")][labels.get("kind", "?")] = value / 2 ** 20
    for stage, kinds in sorted(held.items()):
        line += f"; {stage} allocator {kinds.get('allocated', 0):.0f}/{kinds.get('reserved', 0):.0f} MiB"
    return line, {stage: kinds["allocated"] for stage, kinds in held.items() if "allocated" in kinds}


def live_growth(samples: list[dict]) -> dict[str, float]:
    """Per stage, the lowest live-tensor sample of the run's last third less the lowest of its first third
    (all samples under load, so the in-flight requests' own tensors come and go in both; a leak raises
    the floor). Needs 3 samples."""
    n = len(samples) // 3
    if n == 0:
        return {}
    early, late = samples[:n], samples[-n:]
    stages = set.intersection(*(set(d) for d in samples))
    return {stage: min(d[stage] for d in late) - min(d[stage] for d in early) for stage in sorted(stages)}


def gpu_used_mb() -> float | None:
    """Memory used on the GPUs the server sees (CUDA_VISIBLE_DEVICES, else all), summed."""
    if not shutil.which("nvidia-smi"):
        return None
    cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        cmd.append("--id=" + os.environ["CUDA_VISIBLE_DEVICES"])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        return float(sum(float(x) for x in out.split()))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


# ---- traffic ---------------------------------------------------------------------------------------

class Traffic:
    def __init__(self, args, url: str):
        self.a, self.url = args, url
        self.prompt = open(args.prompt_wav, "rb").read()
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.lock = threading.Lock()
        self.results: list[tuple[str, str, float, str]] = []  # (kind, outcome, seconds, detail)
        self.bad_status: dict = defaultdict(Counter)   # bad input class -> status code -> count
        self.started = 0
        self.stop_at = 0.0

    def _take(self) -> bool:
        with self.lock:
            if time.time() >= self.stop_at or self.started >= self.a.max_requests:
                return False
            self.started += 1
            return True

    def worker(self, index: int) -> None:
        rng = random.Random(self.a.seed * 1000 + index)
        kinds, weights = zip(*self.a.weights.items())
        timeout = httpx.Timeout(self.a.request_deadline, connect=10.0)
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout) as client:
            while self._take():
                kind = rng.choices(kinds, weights)[0]
                n = rng.randint(self.a.min_tokens, self.a.max_tokens)
                t0 = time.time()
                try:
                    outcome, detail = getattr(self, f"_{kind}")(client, rng, n)
                except httpx.TimeoutException as e:
                    outcome, detail = "hung", f"{type(e).__name__} after {time.time() - t0:.1f} s"
                except httpx.HTTPError as e:
                    outcome, detail = "lost", f"{type(e).__name__}: {e}"
                dt = time.time() - t0
                if outcome == "ok" and dt > self.a.request_deadline:
                    outcome, detail = "hung", f"took {dt:.1f} s"
                with self.lock:
                    self.results.append((kind, outcome, dt, detail))

    def _form(self, n: int, **extra) -> dict:
        return {"prompt_text": self.a.prompt_text, "tts_text": TTS_TEXT, "fixed_speech_tokens": str(n), **extra}

    def _files(self) -> dict:
        return {"prompt_wav": ("prompt.wav", self.prompt, "audio/wav")}

    def _stream(self, client, rng, n):
        got = 0
        with client.stream("POST", "/inference_zero_shot", data=self._form(n, stream="true"), files=self._files()) as r:
            if r.status_code != 200:
                r.read()
                return "wrong", f"stream: {r.status_code} {r.text[:200]}"
            for chunk in r.iter_raw():
                got += len(chunk)
        if got != n * BYTES_PER_TOKEN:
            return "wrong", f"stream: {got} bytes, expected {n * BYTES_PER_TOKEN}"
        return "ok", ""

    def _nonstream(self, client, rng, n):
        r = client.post("/inference_zero_shot", data=self._form(n), files=self._files())
        expected = WAV_HEADER_BYTES + n * BYTES_PER_TOKEN
        if r.status_code != 200 or len(r.content) != expected:
            return "wrong", f"nonstream: {r.status_code}, {len(r.content)} bytes, expected {expected}"
        return "ok", ""

    def _json(self, client, rng, n):
        body = {**self._form(n), "prompt_wav": base64.b64encode(self.prompt).decode(), "format": "pcm"}
        r = client.post("/inference_zero_shot", json=body)
        if r.status_code != 200 or len(r.content) != n * BYTES_PER_TOKEN:
            return "wrong", f"json: {r.status_code}, {len(r.content)} bytes, expected {n * BYTES_PER_TOKEN}"
        return "ok", ""

    def _abort(self, client, rng, n):
        # a long request the client hangs up on after the first chunk (or, sometimes, before any)
        n = max(n, 4 * self.a.max_tokens)
        with client.stream("POST", "/inference_zero_shot", data=self._form(n, stream="true"), files=self._files()) as r:
            if r.status_code != 200:
                r.read()
                return "wrong", f"abort: {r.status_code} {r.text[:200]}"
            if rng.random() < 0.8:
                next(r.iter_raw(), None)
        return "ok", ""

    BAD = (
        ("missing tts_text", 400, lambda s: dict(method="POST", url="/inference_zero_shot",
                                                 data={"prompt_text": PROMPT_TEXT}, files=s._files())),
        ("empty audio", 400, lambda s: dict(method="POST", url="/inference_zero_shot", data=s._form(10),
                                            files={"prompt_wav": ("p.wav", b"", "audio/wav")})),
        ("corrupt audio", 400, lambda s: dict(method="POST", url="/inference_zero_shot", data=s._form(10),
                                              files={"prompt_wav": ("p.wav", b"RIFF" + os.urandom(400), "audio/wav")})),
        ("bad speed", 400, lambda s: dict(method="POST", url="/inference_zero_shot", data=s._form(10, speed="9"),
                                          files=s._files())),
        ("malformed json", 400, lambda s: dict(method="POST", url="/inference_zero_shot", content=b"{not json",
                                               headers={"content-type": "application/json"})),
        ("wrong content type", 415, lambda s: dict(method="POST", url="/inference_zero_shot", content=b"hello",
                                                   headers={"content-type": "text/plain"})),
        ("unknown endpoint", 404, lambda s: dict(method="GET", url="/no_such_endpoint")),
        ("wrong method", 405, lambda s: dict(method="PUT", url="/inference_zero_shot")),
        # the classes that once gave 500 or cost unbounded memory (docs/reliability.md, "Input classes")
        ("lone surrogate in JSON text", 400, lambda s: dict(
            method="POST", url="/inference_zero_shot", headers={"content-type": "application/json"},
            content=json.dumps({**s._form(10), "tts_text": "Hi \ud800",
                                "prompt_wav": base64.b64encode(s.prompt).decode()}))),
        *((f"JSON nested 100000 deep, {path}", 400, lambda s, path=path: dict(
            method="POST", url=path, content=b"[" * 100000, headers={"content-type": "application/json"}))
          for path in ("/inference_zero_shot", "/v1/audio/speech", "/voices")),
        ("prompt at 4 kHz", 400, lambda s: dict(method="POST", url="/inference_zero_shot", data=s._form(10),
                                                 files={"prompt_wav": ("p.wav", wav_bytes(4000, 1), "audio/wav")})),
        ("prompt with 9 channels", 400, lambda s: dict(method="POST", url="/inference_zero_shot", data=s._form(10),
                                                        files={"prompt_wav": ("p.wav", wav_bytes(16000, 9),
                                                                              "audio/wav")})),
        ("/inference_instruct (CosyVoice-300M route)", 400, lambda s: dict(
            method="POST", url="/inference_instruct", data={"tts_text": "x", "spk_id": "a", "instruct_text": "y"})),
    )

    def _bad(self, client, rng, n):
        name, status, make = rng.choice(self.BAD)
        r = client.request(**make(self))
        with self.lock:
            self.bad_status[name][r.status_code] += 1
        try:
            has_detail = isinstance(r.json().get("detail"), str)
        except ValueError:
            has_detail = False
        if r.status_code != status or not has_detail:
            return "wrong", f"bad ({name}): {r.status_code} {r.text[:200]}, expected {status} with a detail"
        return "ok", ""


def wav_bytes(rate: int, channels: int, seconds: float = 1.0) -> bytes:
    """A 16-bit PCM WAV of silence (the header is what the server refuses)."""
    import struct
    frames = int(rate * seconds)
    data = bytes(2 * channels * frames)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16) +
            b"data" + struct.pack("<I", len(data)) + data)


# ---- the run ---------------------------------------------------------------------------------------

def start_server(a) -> ServerProcess:
    tmp = tempfile.mkdtemp(prefix="soak-")
    extra = a.server_args.split() + (["--api_key", a.api_key] if a.api_key else [])
    port = free_port()
    server = ServerProcess(api_server_cmd(a.model_dir, port, tmp, *extra), port, os.path.join(tmp, "server.log"),
                           cwd=a.server_src, env=server_env(a.server_src))
    try:
        return server.wait_healthy(timeout=300)
    except (RuntimeError, TimeoutError) as e:
        server.stop()
        raise SystemExit(f"{e}\nlog: {server.log_path}") from None


def run(a) -> int:
    server = None
    url = a.url
    if a.model_dir:
        server = start_server(a)
        url = server.url
        print(f"started server {url} (pid {server.proc.pid}, log {server.log_path})", flush=True)
    url = url.rstrip("/")
    session = server.proc.pid if server else None
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    failures: list[str] = []
    try:
        if httpx.get(url + "/healthz", timeout=5).status_code != 200:
            raise SystemExit(f"{url}/healthz is not 200: the server is not healthy")
        traffic = Traffic(a, url)
        # warm-up: first-use imports and caches must not count as growth
        with httpx.Client(base_url=url, headers=headers, timeout=a.request_deadline) as c:
            for kind in ("nonstream", "stream"):
                outcome, detail = getattr(traffic, f"_{kind}")(c, random.Random(0), a.min_tokens)
                if outcome != "ok":
                    raise SystemExit(f"warm-up {kind} failed: {detail}")
        duration = a.minutes * 60
        t_start = time.time()
        traffic.stop_at = t_start + duration
        threads = [threading.Thread(target=traffic.worker, args=(i,), daemon=True) for i in range(a.concurrency)]
        for t in threads:
            t.start()

        # baseline memory at 20% of the run (past allocator warm-up), then progress lines
        time.sleep(0.2 * duration)
        procs = server_processes(session, urlparse(url).port or 80)
        rss0 = {pid: rss_mb(pid) for pid in procs}
        gpu0 = gpu_used_mb()
        gauges0, live0 = server_gauges(url, headers)
        live_samples = [live0]   # live GPU tensors per stage, under load, every 30 s
        next_print = time.time() + 30
        while any(t.is_alive() for t in threads):
            if time.time() > traffic.stop_at + a.request_deadline + 30:
                failures.append("worker threads still busy long after the deadline (hung requests)")
                break
            time.sleep(0.5)
            if time.time() >= next_print:
                with traffic.lock:
                    counts = Counter(o for _, o, _, _ in traffic.results)
                rss = ", ".join(f"{procs[pid].replace('lighttts::', '')} {rss_mb(pid) or 0:.0f}"
                                for pid in sorted(procs, key=procs.get) if procs[pid].startswith("lighttts::"))
                gpu = gpu_used_mb()
                gauges, live = server_gauges(url, headers)
                live_samples.append(live)
                print(f"[{time.time() - t_start:6.0f} s] {sum(counts.values())} requests: {dict(counts)}; "
                      f"RSS MiB: {rss}" + ("" if gpu is None else f"; GPU used {gpu:.0f} MiB") +
                      f"; {gauges}", flush=True)
                next_print += 30
        wall = time.time() - t_start

        # drain: the pool must come back to completely free
        settle_t0 = time.time()
        while True:
            metrics = parse_prometheus(httpx.get(url + "/metrics", headers=headers, timeout=10).text)
            gauges = {name: metric_values(metrics, name)
                      for name in ("lighttts_llm_kv_used", "lighttts_llm_running", "lighttts_decode_active")}
            drained = all(v and all(x == 0 for x in v) for v in gauges.values())
            if drained or time.time() - settle_t0 > a.settle:
                break
            time.sleep(0.3)
        settle_s = time.time() - settle_t0
        if not drained:
            failures.append(f"pool not free {a.settle:g} s after traffic stopped: {gauges}")
        health = httpx.get(url + "/healthz", timeout=10)
        if health.status_code != 200:
            failures.append(f"/healthz after the run: {health.status_code} {health.text}")
        rss1 = {pid: rss_mb(pid) for pid in procs}
        gpu1 = gpu_used_mb()
        gauges1, _ = server_gauges(url, headers)
    finally:
        if server is not None:
            rc = server.stop()
            if rc != 0:
                print(f"server exited with {rc}; log: {server.log_path}")

    # ---- report --------------------------------------------------------------------------------
    by_kind = defaultdict(Counter)
    lat = defaultdict(list)
    bad_details = []
    for kind, outcome, dt, detail in traffic.results:
        by_kind[kind][outcome] += 1
        lat[kind].append(dt)
        if outcome != "ok":
            bad_details.append(f"{kind}: {outcome}: {detail}")
    print(f"\nsoak summary: {url}, {a.concurrency} concurrent, {wall:.0f} s of traffic "
          f"({a.minutes:g} min asked), {len(traffic.results)} requests, seed {a.seed}")
    print(f"{'kind':<10} {'requests':>8} {'ok':>8} {'wrong':>6} {'lost':>6} {'hung':>6} {'p50 s':>7} {'max s':>7}")
    for kind in KINDS:
        if kind in by_kind:
            c, ls = by_kind[kind], sorted(lat[kind])
            print(f"{kind:<10} {sum(c.values()):>8} {c['ok']:>8} {c['wrong']:>6} {c['lost']:>6} {c['hung']:>6} "
                  f"{ls[len(ls) // 2]:>7.2f} {ls[-1]:>7.2f}")
    if traffic.bad_status:
        expected = {name: status for name, status, _ in Traffic.BAD}
        print(f"\n| bad input class | requests | expected | status codes seen |\n| --- | ---: | ---: | --- |")
        for name, codes in sorted(traffic.bad_status.items()):
            seen = ", ".join(f"{code} x{count}" for code, count in sorted(codes.items()))
            print(f"| {name} | {sum(codes.values())} | {expected[name]} | {seen} |")
        server_errors = sum(c for codes in traffic.bad_status.values() for code, c in codes.items() if code >= 500)
        print(f"5xx answers to bad input: {server_errors}\n")
    not_ok = sum(1 for _, o, _, _ in traffic.results if o != "ok")
    if not_ok:
        failures.append(f"{not_ok} requests did not end as expected (first: {bad_details[:3]})")
    if traffic.started != len(traffic.results):
        failures.append(f"{traffic.started - len(traffic.results)} requests started but never finished")
    print(f"pool after {settle_s:.1f} s settle: " + ", ".join(f"{k}={v}" for k, v in gauges.items()))
    print(f"{'process':<24} {'pid':>8} {'RSS@20% MiB':>12} {'RSS end MiB':>12} {'growth':>16}")
    for pid, name in sorted(procs.items(), key=lambda kv: kv[1]):
        r0, r1 = rss0.get(pid), rss1.get(pid)
        if r0 is None or r1 is None:
            failures.append(f"process {name} ({pid}) exited during the run")
            print(f"{name:<24} {pid:>8} {'-':>12} {'gone':>12}")
            continue
        grow = r1 - r0
        limit = max(r0 * a.rss_growth_pct / 100, a.rss_growth_mb)
        flag = "" if grow <= limit else "  FAIL"
        if flag:
            failures.append(f"{name} RSS grew {grow:+.0f} MiB ({r0:.0f} -> {r1:.0f}), limit {limit:.0f} MiB")
        print(f"{name:<24} {pid:>8} {r0:>12.1f} {r1:>12.1f} {grow:>+9.1f} ({100 * grow / r0:+.1f}%){flag}")
    if gpu0 is not None and gpu1 is not None:
        print(f"GPU memory used: {gpu0:.0f} -> {gpu1:.0f} MiB ({gpu1 - gpu0:+.0f})")
        print(f"  at 20%: {gauges0}\n  at end: {gauges1}")
        if gpu1 - gpu0 > a.gpu_growth_mb:
            failures.append(f"GPU memory grew {gpu1 - gpu0:+.0f} MiB (limit {a.gpu_growth_mb:g})")
        for stage, grew in live_growth(live_samples).items():
            print(f"  {stage} live GPU tensors under load, lowest of the last third vs of the first: {grew:+.0f} MiB")
            if grew > a.gpu_live_growth_mb:
                failures.append(f"{stage}: live GPU tensors grew {grew:+.0f} MiB (limit {a.gpu_live_growth_mb:g})")
    else:
        print("GPU memory: no nvidia-smi")
    if failures:
        print("\nSOAK FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nSOAK PASSED: no lost or hung requests, pool free, memory flat")
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
