#!/usr/bin/env python3
"""Watch LightTTS instances: a live table from /healthz and /metrics.

    python scripts/monitor.py                                   # http://127.0.0.1:8080 every 5 s
    python scripts/monitor.py --url http://127.0.0.1:8080 --url http://127.0.0.1:8081
    python scripts/monitor.py --url ... --restart-cmd 'scripts/start_lighttts_a10.sh restart'
    python scripts/monitor.py --once --json                     # two samples --interval apart, then exit

Columns: health, requests/s and errors (non-2xx answers) over the last interval, first-chunk
latency p50/p99 from the lighttts_first_chunk_seconds histogram (over the interval when it saw
requests, else since the instance started: marked *), KV cache use, LLM running/waiting requests,
HTTP requests in flight, stages down. With nvidia-smi present, a GPU memory line follows.

--restart-cmd runs (through the shell) after an instance failed --restart-after polls in a row,
at most once per --restart-cooldown seconds per instance; {url} and {port} in it are replaced and
LIGHTTTS_URL / LIGHTTTS_PORT are set. --once exits 0 when every instance is healthy, else 1.
Standard library and this checkout's light_tts.tools.client_util (numpy) only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from light_tts.tools.client_util import histogram_buckets, metric_first, metric_total, parse_prometheus  # noqa: E402

def quantile(q: float, bks: list):
    """histogram_quantile: linear interpolation inside the bucket holding the q-th observation."""
    if not bks or bks[-1][1] <= 0:
        return None
    rank = q * bks[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in bks:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # beyond the largest finite bucket: report its bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return None


def diff_buckets(new: list, old: list) -> list:
    old_map = dict(old)
    return [(b, c - old_map.get(b, 0.0)) for b, c in new]


def fetch(url: str, timeout: float, api_key: str = "") -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except urllib.error.URLError as e:  # refused, DNS
        return 0, str(e.reason)
    except Exception as e:  # timeout, reset: the instance is not answering
        return 0, f"{type(e).__name__}: {e}"


class Instance:
    def __init__(self, url: str, api_key: str = ""):
        self.url = url.rstrip("/")
        self.api_key = api_key    # /metrics needs it on an instance started with one (health does not)
        self.prev = None          # (time, metrics) of the previous poll
        self.fails = 0            # consecutive unhealthy polls
        self.last_restart = -math.inf
        self.row: dict = {}

    def poll(self, timeout: float) -> dict:
        now = time.time()
        code, body = fetch(self.url + "/healthz", timeout)
        healthy = code == 200
        row = {"url": self.url, "healthy": healthy,
               "health": "ok" if healthy else (f"HTTP {code}" if code else "down")}
        if not healthy:
            try:
                row["detail"] = json.loads(body).get("detail", "")
            except (ValueError, AttributeError):
                row["detail"] = body[:80]
        mcode, mtext = fetch(self.url + "/metrics", timeout, self.api_key) if code else (0, "")
        metrics = parse_prometheus(mtext) if mcode == 200 else {}
        if metrics:
            req = metric_total(metrics, "lighttts_requests_total")
            err = metric_total(metrics, "lighttts_requests_total", lambda l: not l.get("status", "").startswith("2"))
            bks = histogram_buckets(metrics, "lighttts_first_chunk_seconds")
            gauge = lambda name: metric_first(metrics, "lighttts_" + name)  # noqa: E731
            row.update(requests_total=req, errors_total=err, kv_used=gauge("llm_kv_used"), kv_total=gauge("llm_kv_total"),
                       running=gauge("llm_running"), waiting=gauge("llm_waiting"), in_flight=gauge("http_in_flight"),
                       stages_down=[l.get("stage") for l, v in metrics.get("lighttts_stage_up", []) if v != 1.0])
            window = bks
            row["latency_window"] = "all"
            if self.prev is not None:
                t_prev, m_prev = self.prev
                dt = max(now - t_prev, 1e-6)
                row["req_per_s"] = max(0.0, req - metric_total(m_prev, "lighttts_requests_total")) / dt
                row["errors"] = max(0.0, err - metric_total(m_prev, "lighttts_requests_total",
                                                    lambda l: not l.get("status", "").startswith("2")))
                d = diff_buckets(bks, histogram_buckets(m_prev, "lighttts_first_chunk_seconds"))
                if d and d[-1][1] > 0:
                    window, row["latency_window"] = d, "interval"
            row["p50"], row["p99"] = quantile(0.5, window), quantile(0.99, window)
            self.prev = (now, metrics)
        self.fails = 0 if healthy else self.fails + 1
        self.row = row
        return row

    def maybe_restart(self, args) -> None:
        if not args.restart_cmd or self.fails < args.restart_after:
            return
        if time.time() - self.last_restart < args.restart_cooldown:
            return
        self.last_restart = time.time()
        port = str(urllib.parse.urlsplit(self.url).port or "")
        cmd = args.restart_cmd.replace("{url}", self.url).replace("{port}", port)
        print(f"[{time.strftime('%H:%M:%S')}] {self.url} unhealthy for {self.fails} polls: running {cmd}", flush=True)
        env = {**os.environ, "LIGHTTTS_URL": self.url, "LIGHTTTS_PORT": port}
        try:
            r = subprocess.run(cmd, shell=True, env=env, timeout=args.restart_timeout)
            print(f"[{time.strftime('%H:%M:%S')}] restart command exited with {r.returncode}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"[{time.strftime('%H:%M:%S')}] restart command still running after {args.restart_timeout} s",
                  flush=True)


def fmt(v, spec="{:.0f}", none="-"):
    return none if v is None else spec.format(v)


def table(rows: list) -> str:
    head = f"{'INSTANCE':<26} {'HEALTH':<8} {'REQ/S':>6} {'ERR':>4} {'P50 1ST':>8} {'P99 1ST':>8} " \
           f"{'KV USED':>14} {'RUN/WAIT':>9} {'IN-FL':>5}  STAGES DOWN"
    lines = [head]
    for r in rows:
        kv = "-"
        if r.get("kv_total"):
            kv = f"{r['kv_used']:.0f}/{r['kv_total']:.0f} {100 * r['kv_used'] / r['kv_total']:.0f}%"
        star = "*" if r.get("latency_window") == "all" else ""
        lat = lambda v: "-" if v is None else f"{v * 1000:.0f}ms{star}"  # noqa: E731
        rw = "-" if r.get("running") is None else f"{r['running']:.0f}/{fmt(r.get('waiting'))}"
        down = ", ".join(r.get("stages_down") or []) or ("" if r["healthy"] else r.get("detail", ""))
        lines.append(f"{r['url'][:26]:<26} {r['health']:<8} {fmt(r.get('req_per_s'), '{:.2f}'):>6} "
                     f"{fmt(r.get('errors')):>4} {lat(r.get('p50')):>8} {lat(r.get('p99')):>8} {kv:>14} "
                     f"{rw:>9} {fmt(r.get('in_flight')):>5}  {down}")
    return "\n".join(lines)


def gpu_line() -> str:
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total,utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    parts = []
    for line in out.strip().splitlines():
        i, used, tot, util = [x.strip() for x in line.split(",")]
        parts.append(f"GPU {i}: {used}/{tot} MiB, {util}% busy")
    return "  ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--url", action="append", help="instance base URL; repeat for several (default http://127.0.0.1:8080)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per HTTP call")
    p.add_argument("--once", action="store_true", help="poll twice --interval apart, print, exit (0: all healthy)")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    p.add_argument("--api_key", default=os.environ.get("LIGHTTTS_API_KEY", ""),
                   help="Bearer key for /metrics on instances started with one (default: $LIGHTTTS_API_KEY)")
    p.add_argument("--restart-cmd", dest="restart_cmd", default="", help="shell command for an instance that stays unhealthy")
    p.add_argument("--restart-after", dest="restart_after", type=int, default=3, help="unhealthy polls in a row before the hook")
    p.add_argument("--restart-cooldown", dest="restart_cooldown", type=float, default=120.0,
                   help="seconds between two restarts of one instance")
    p.add_argument("--restart-timeout", dest="restart_timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.interval <= 0 or args.restart_after < 1:
        p.error("--interval must be > 0 and --restart-after >= 1")
    instances = [Instance(u, args.api_key) for u in (args.url or ["http://127.0.0.1:8080"])]
    live = sys.stdout.isatty() and not args.once and not args.json
    try:
        polls = 0
        while True:
            rows = [inst.poll(args.timeout) for inst in instances]
            polls += 1
            if not (args.once and polls == 1):
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                if args.json:
                    print(json.dumps({"time": stamp, "instances": rows}), flush=True)
                else:
                    if live:
                        sys.stdout.write("\033[H\033[J")
                    # --once exits by itself: no Ctrl-C hint
                    print(f"LightTTS monitor {stamp}" + (f" (rates over {args.interval:g} s)" if args.once else
                                                         f" (every {args.interval:g} s, Ctrl-C to quit)"))
                    print(table(rows))
                    g = gpu_line()
                    if g:
                        print(g)
                    print(flush=True)
                for inst in instances:
                    inst.maybe_restart(args)
                if args.once:
                    return 0 if all(r["healthy"] for r in rows) else 1
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
