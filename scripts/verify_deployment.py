#!/usr/bin/env python3
"""Check a running LightTTS deployment (seed 000: `python verify_deployment.py --full`).

    python scripts/verify_deployment.py                      # http://127.0.0.1:8080: health, model, metrics
    python scripts/verify_deployment.py --full               # + zero-shot WAV, streaming, concurrency
    python scripts/verify_deployment.py --full --url http://127.0.0.1:8000 --url http://127.0.0.1:8080

Checks, for every --url:
  health       GET /healthz answers 200 {"status": "healthy"}
  model        GET /query_tts_model lists at least one model
  metrics      GET /metrics is Prometheus text with lighttts_stage_up for every stage, all 1
  zero_shot    (--full) POST /inference_zero_shot: a WAV with a valid RIFF header, PCM16 mono
               24 kHz, a data chunk that matches the header, duration > 0
  stream       (--full) the same with stream=true: time to the first audio chunk, whole samples
  concurrency  (--full) --concurrency requests at once: every one a valid WAV

Prints a pass/fail table and exits 0 when every check passes, 1 otherwise. Needs only the standard
library and this checkout's light_tts.tools.client_util (numpy), not the server's dependencies.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from light_tts.tools.client_util import WavError, parse_prometheus, parse_wav, pcm_seconds  # noqa: E402

DEFAULT_PROMPT = os.path.join(ROOT, "tests", "fixtures", "prompt_en.wav")
DEFAULT_PROMPT_TEXT = "The quick brown fox jumps over the lazy dog."
DEFAULT_TTS_TEXT = "LightTTS部署成功，语音合成正常"  # seed 000's manual test


class CheckFailed(Exception):
    pass


def request(url: str, method: str = "GET", body: bytes = None, headers: dict = None, timeout: float = 30.0):
    """One HTTP request; returns (status, headers, connection response) with the body unread."""
    u = urllib.parse.urlsplit(url)
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(u.hostname, u.port, timeout=timeout)
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    conn.request(method, path, body=body, headers=headers or {})
    return conn.getresponse()


def get(url: str, api_key: str, timeout: float = 10.0) -> tuple[int, bytes]:
    resp = request(url, headers=auth(api_key), timeout=timeout)
    return resp.status, resp.read()


def auth(api_key: str) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = []
    for name, value in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, ctype) in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f'Content-Type: {ctype}\r\n\r\n'.encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


class Verifier:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        with open(args.prompt_wav, "rb") as f:
            self.prompt = f.read()

    def record(self, url, name, fn):
        t0 = time.time()
        try:
            detail = fn(url)
            ok = True
        except CheckFailed as e:
            ok, detail = False, str(e)
        except (OSError, http.client.HTTPException) as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        self.rows.append({"url": url, "check": name, "ok": ok, "seconds": round(time.time() - t0, 3),
                          "detail": detail})
        return ok

    # ---- checks
    def health(self, url):
        status, body = get(url + "/healthz", self.args.api_key)
        if status != 200:
            raise CheckFailed(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        if json.loads(body).get("status") != "healthy":
            raise CheckFailed(f"unexpected body {body[:200]!r}")
        return body.decode().strip()

    def model(self, url):
        status, body = get(url + "/query_tts_model", self.args.api_key)
        if status != 200:
            raise CheckFailed(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        models = json.loads(body).get("tts_models")
        if not isinstance(models, list) or not models:
            raise CheckFailed(f"no model listed: {body[:200]!r}")
        return "tts_models: " + ", ".join(map(str, models))

    def metrics(self, url):
        status, body = get(url + "/metrics", self.args.api_key)
        if status != 200:
            raise CheckFailed(f"HTTP {status}")
        stages = {labels.get("stage"): v for labels, v in parse_prometheus(body.decode()).get("lighttts_stage_up", [])}
        if not stages:
            raise CheckFailed("no lighttts_stage_up in /metrics")
        down = [s for s, v in stages.items() if v != 1.0]
        if down:
            raise CheckFailed("stages down: " + ", ".join(down))
        return f"{len(stages)} stages up ({', '.join(stages)})"

    def _fields(self, stream: bool) -> dict:
        fields = {"prompt_text": self.args.prompt_text, "tts_text": self.args.tts_text,
                  "stream": "true" if stream else "false"}
        if self.args.fixed_speech_tokens:
            fields["fixed_speech_tokens"] = str(self.args.fixed_speech_tokens)
        return fields

    def _synthesize(self, url, stream: bool):
        body, ctype = multipart(self._fields(stream),
                                {"prompt_wav": (os.path.basename(self.args.prompt_wav), self.prompt, "audio/wav")})
        headers = {"Content-Type": ctype, **auth(self.args.api_key)}
        return request(url + "/inference_zero_shot", "POST", body, headers, timeout=self.args.timeout)

    def _one_wav(self, url):
        t0 = time.time()
        resp = self._synthesize(url, stream=False)
        body = resp.read()
        if resp.status != 200:
            raise CheckFailed(f"HTTP {resp.status}: {body[:300].decode(errors='replace')}")
        ctype = resp.getheader("Content-Type", "")
        if not ctype.startswith("audio/wav"):
            raise CheckFailed(f"Content-Type {ctype!r}, expected audio/wav")
        try:
            info = parse_wav(body)
        except WavError as e:
            raise CheckFailed(str(e)) from None
        if info["bytes"] == 0:
            raise CheckFailed("a WAV with no audio")
        return info, body, time.time() - t0

    def zero_shot(self, url):
        info, body, seconds = self._one_wav(url)
        if self.args.out:
            with open(self.args.out, "wb") as f:
                f.write(body)
        return (f"{info['seconds']:.2f} s of {info['rate']} Hz mono PCM16 ({len(body) / 1000:.1f} KB) "
                f"in {seconds:.2f} s" + (f" -> {self.args.out}" if self.args.out else ""))

    def stream(self, url):
        t0 = time.time()
        resp = self._synthesize(url, stream=True)
        if resp.status != 200:
            raise CheckFailed(f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}")
        first, total, chunks = None, 0, 0
        while True:
            piece = resp.read1(65536)
            if not piece:
                break
            if first is None:
                first = time.time() - t0
            total += len(piece)
            chunks += 1
        if total == 0:
            raise CheckFailed("the stream carried no audio")
        if total % 2:
            raise CheckFailed(f"{total} bytes is not whole 16-bit samples")
        return (f"first chunk {first * 1000:.0f} ms, {pcm_seconds(total):.2f} s audio in {chunks} reads, "
                f"total {time.time() - t0:.2f} s")

    def concurrency(self, url):
        n = self.args.concurrency
        t0 = time.time()
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(self._one_wav, url) for _ in range(n)]
            results, errors = [], []
            for f in futures:
                try:
                    results.append(f.result())
                except (CheckFailed, OSError, http.client.HTTPException) as e:
                    errors.append(str(e))
        if errors:
            raise CheckFailed(f"{len(errors)} of {n} failed: {errors[0]}")
        lat = sorted(r[2] for r in results)
        return (f"{n} parallel requests ok in {time.time() - t0:.2f} s "
                f"(latency p50 {lat[len(lat) // 2]:.2f} s, max {lat[-1]:.2f} s)")

    def run(self) -> int:
        for url in self.args.url:
            url = url.rstrip("/")
            if not self.record(url, "health", self.health):
                continue  # the rest cannot pass; the failed health row says why
            self.record(url, "model", self.model)
            self.record(url, "metrics", self.metrics)
            if self.args.full:
                self.record(url, "zero_shot", self.zero_shot)
                self.record(url, "stream", self.stream)
                self.record(url, "concurrency", self.concurrency)
        failed = [r for r in self.rows if not r["ok"]]
        if self.args.json:
            print(json.dumps({"ok": not failed, "checks": self.rows}, ensure_ascii=False, indent=1))
        else:
            self.print_table(failed)
        return 1 if failed else 0

    def print_table(self, failed):
        w = max(len(r["url"]) for r in self.rows)
        print(f"LightTTS deployment check {time.strftime('%Y-%m-%d %H:%M:%S')}")
        print(f"{'URL':<{w}}  {'CHECK':<12} {'RESULT':<6} {'TIME':>8}  DETAIL")
        for r in self.rows:
            print(f"{r['url']:<{w}}  {r['check']:<12} {'PASS' if r['ok'] else 'FAIL':<6} "
                  f"{r['seconds']:>7.2f}s  {r['detail']}")
        if failed:
            print(f"deployment FAILED: {len(failed)} of {len(self.rows)} checks failed")
        else:
            print(f"deployment VERIFIED: {len(self.rows)} checks passed")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--url", action="append", help="server or nginx base URL; repeat for several "
                                                  "(default http://127.0.0.1:8080)")
    p.add_argument("--full", action="store_true", help="also synthesise: zero-shot WAV, streaming, concurrency")
    p.add_argument("--prompt_wav", default=DEFAULT_PROMPT, help="prompt audio (default: the repository's test prompt)")
    p.add_argument("--prompt_text", default=None, help="transcript of --prompt_wav")
    p.add_argument("--tts_text", default=DEFAULT_TTS_TEXT)
    p.add_argument("--fixed_speech_tokens", type=int, default=0,
                   help="ask for exactly N speech tokens per sentence (random test models rarely stop by themselves)")
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests in the concurrency check")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per synthesis request")
    p.add_argument("--out", default=None, help="save the zero-shot WAV here (seed 000: /tmp/test_output.wav)")
    p.add_argument("--api_key", default=os.environ.get("LIGHTTTS_API_KEY", ""), help="Bearer key (env LIGHTTTS_API_KEY)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    args.url = args.url or ["http://127.0.0.1:8080"]
    if args.prompt_text is None:
        if os.path.abspath(args.prompt_wav) != DEFAULT_PROMPT:
            p.error("--prompt_text is required with your own --prompt_wav (its transcript)")
        args.prompt_text = DEFAULT_PROMPT_TEXT
    if args.full and not os.path.isfile(args.prompt_wav):
        p.error(f"--prompt_wav {args.prompt_wav}: no such file")
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    if not args.full:
        args.prompt_wav = args.prompt_wav if os.path.isfile(args.prompt_wav) else os.devnull
    return Verifier(args).run()


if __name__ == "__main__":
    sys.exit(main())
