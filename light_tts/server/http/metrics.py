"""Prometheus metrics (/metrics).

Request counters and latency histograms live in the HTTP workers; with several workers
prometheus-client's multiprocess mode sums them (the launcher points PROMETHEUS_MULTIPROC_DIR into
the instance directory before workers start). Stage gauges (LLM batch size, KV use, decode load,
stage up/down) are read at scrape time from the stats files the stages publish.

The access log (`log_request`) is the per-request side of the same numbers: one line per HTTP
request and per WebSocket utterance, written when it ends.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from light_tts.server.io_struct import FIRST_CHUNK_MARKS
from light_tts.server.ipc import Endpoints, read_stats, stage_health

LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# First-chunk breakdown: stage i is the time from FIRST_CHUNK_MARKS[i] to the next mark (the last one
# to the HTTP worker's receipt of the first audio). "wait" stages are the hand-over (socket, pickling)
# plus queueing in the next stage.
FIRST_CHUNK_STAGES = ("encode_wait", "encode", "llm_wait", "prefill", "first_tokens", "decode_wait", "decode",
                      "to_http")


def first_chunk_stages(marks: dict, received: float) -> list[tuple[str, float]]:
    """(stage, seconds) for each stage whose two marks are known."""
    points = [marks.get(m) for m in FIRST_CHUNK_MARKS] + [received]
    return [(stage, max(0.0, b - a)) for stage, a, b in zip(FIRST_CHUNK_STAGES, points, points[1:])
            if a is not None and b is not None]
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


class StageCollector:
    def __init__(self, endpoints: Endpoints):
        self.endpoints = endpoints

    def collect(self):
        up = GaugeMetricFamily("lighttts_stage_up", "1 if the stage process is alive and beating", labels=["stage"])
        for stage, why in stage_health(self.endpoints).items():
            up.add_metric([stage], 1.0 if why == "ok" else 0.0)
        yield up
        stats = read_stats(self.endpoints)
        llm = dict(stats.get("llm", {}))
        llm.setdefault("kv_used", llm.get("kv_tokens"))      # names of the plain-PyTorch engine
        llm.setdefault("kv_total", llm.get("kv_capacity"))
        if llm.get("waiting") is not None:   # what an operator greps /metrics for (seed 001: `grep queue`)
            yield GaugeMetricFamily("lighttts_llm_queue_size", "requests in the LLM's queue: encoded, not yet admitted "
                                                               "(the LLM stage's count; also lighttts_llm_waiting)",
                                    value=float(llm["waiting"]))
        for key, help_text in (("running", "requests decoding in the LLM"),
                               ("waiting", "requests waiting for admission to the LLM"),
                               ("batch_size", "LLM decode batch size of the last step"),
                               ("max_batch_size", "largest LLM decode batch so far"),
                               ("kv_used", "KV-cache tokens in use"),
                               ("kv_total", "KV-cache capacity in tokens"),
                               ("generated_tokens", "speech tokens generated"),
                               ("aborted", "requests aborted in the LLM"),
                               ("rejected", "requests the LLM refused (too long)")):
            if llm.get(key) is not None:
                yield GaugeMetricFamily(f"lighttts_llm_{key}", help_text, value=float(llm[key]))
        for key, help_text in (("active", "requests held by a decode process"),
                               ("prompt_cache_hits", "streaming rows that found their voice's prompt frames cached"),
                               ("prompt_cache_misses", "voices whose prompt frames were computed into the cache"),
                               ("prompt_cache_voices", "voices in the prompt cache"),
                               ("stream_cache_streams", "streams holding cached frames (--decode_stream_cache)"),
                               ("stream_cache_frames_reused", "cached stream frames chunks continued instead of "
                                                              "recomputing"),
                               ("stream_cache_fallbacks", "chunks that recomputed their stream's frames for want of "
                                                          "room"),
                               ("graph_captures_while_serving", "decode CUDA graphs captured after the start's "
                                                                "warm-up (each stalls the decode loop)")):
            kind = CounterMetricFamily if key in COUNTERS else GaugeMetricFamily
            family = kind(f"lighttts_decode_{key}", help_text, labels=["stage"])
            for stage, s in stats.items():
                if stage.startswith("decode") and key in s:
                    family.add_metric([stage], float(s[key]))
            yield family
        gpu = GaugeMetricFamily("lighttts_gpu_memory_bytes", "PyTorch's CUDA allocator per stage: allocated (live "
                                "tensors), reserved (held from the driver), max_reserved (its high-water mark)",
                                labels=["stage", "kind"])
        for stage, s in stats.items():
            for kind in ("allocated", "reserved", "max_reserved"):
                if f"gpu_{kind}_bytes" in s:
                    gpu.add_metric([stage, kind], float(s[f"gpu_{kind}_bytes"]))
        yield gpu


COUNTERS = ("prompt_cache_hits", "prompt_cache_misses", "stream_cache_frames_reused", "stream_cache_fallbacks",
            "graph_captures_while_serving")


class Metrics:
    def __init__(self, endpoints: Endpoints):
        self.registry = CollectorRegistry()
        multiproc = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if multiproc and os.path.isdir(multiproc):
            from prometheus_client import multiprocess
            multiprocess.MultiProcessCollector(self.registry)
            own = None  # per-worker values are written to files and summed by the collector
        else:
            own = self.registry
        self.requests = Counter("lighttts_requests_total", "finished HTTP requests", ["endpoint", "status"],
                                registry=own)
        self.first_chunk_seconds = Histogram("lighttts_first_chunk_seconds", "request arrival to first audio",
                                             buckets=LATENCY_BUCKETS, registry=own)
        self.first_chunk_stage_seconds = Histogram(
            "lighttts_first_chunk_stage_seconds", "first-chunk breakdown: seconds per stage on the way to the first audio",
            ["stage"], buckets=STAGE_BUCKETS, registry=own)
        self.rtf = Histogram("lighttts_rtf", "wall time / audio time per request", buckets=RTF_BUCKETS, registry=own)
        self.audio_seconds = Counter("lighttts_audio_seconds_total", "audio produced", registry=own)
        self.registry.register(StageCollector(endpoints))

    def done(self, endpoint: str, status: int, audio_seconds: float = 0.0, wall: float = 0.0) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if audio_seconds > 0:
            self.audio_seconds.inc(audio_seconds)
            self.rtf.observe(wall / audio_seconds)

    def first_chunk(self, seconds: float, marks: Optional[dict] = None, received: float = 0.0) -> None:
        self.first_chunk_seconds.observe(seconds)
        for stage, secs in first_chunk_stages(marks or {}, received):
            self.first_chunk_stage_seconds.labels(stage).observe(secs)

    def render(self, in_flight: int, rejected: int) -> tuple[bytes, str]:
        extra = (f"# HELP lighttts_http_in_flight requests in flight in this HTTP worker\n"
                 f"# TYPE lighttts_http_in_flight gauge\nlighttts_http_in_flight {in_flight}\n"
                 f"# HELP lighttts_http_rejected_total requests refused as overload by this HTTP worker\n"
                 f"# TYPE lighttts_http_rejected_total counter\nlighttts_http_rejected_total {rejected}\n")
        return generate_latest(self.registry) + extra.encode(), CONTENT_TYPE_LATEST


access_log = logging.getLogger("lighttts.access")


def log_request(rid: str, method: str, endpoint: str, status: int, audio_seconds: float = 0.0,
                first_chunk: Optional[float] = None, total: float = 0.0, level: int = logging.INFO) -> None:
    """The access line of one request (HTTP) or utterance (WebSocket, method WS), when it ends:

        access rid=3f2a1c9b04-17 method=POST endpoint=/inference_zero_shot status=200 audio_s=3.520
        first_chunk_ms=182.4 cost_time: 1243.9ms

    first_chunk_ms is "-" when no audio went out. cost_time (arrival to the end of the answer, in ms)
    comes last so that seed 001's `grep cost_time ... | awk '{print $NF}' | sed 's/ms//'` reads it."""
    access_log.log(level, "access rid=%s method=%s endpoint=%s status=%d audio_s=%.3f first_chunk_ms=%s "
                          "cost_time: %.1fms", rid, method, endpoint, status, audio_seconds,
                   "-" if first_chunk is None else f"{first_chunk * 1000:.1f}", total * 1000)
