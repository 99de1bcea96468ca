"""Client, streaming check and load benchmark for LightTTS's WebSocket API `WS /ws/tts` (docs/websocket.md).

    python scripts/ws_client.py --text "你好，欢迎使用。" --out hello.wav
    python scripts/ws_client.py --simulate-stream [--piece-chars 4] [--piece-interval-ms 30]
    python scripts/ws_client.py --test-interrupt [--interrupt-after-ms 300] [--interrupt-deadline-ms 2000]
    python scripts/ws_client.py --bench --parallel 20 --rounds 5 [--json bench.json] [--out-dir wavs/]

Modes:
  (default)          one utterance: the whole text in one `text` message, then `finish`
  --simulate-stream  the text as an LLM writes it: --piece-chars characters (split anywhere, mid-word
                     too) every --piece-interval-ms, then `finish`, receiving all the while; says whether
                     audio arrived before `finish` was sent (that is what proves streaming)
  --test-interrupt   barge-in: stream the text without `finish` (--interrupt-finish: with it), send
                     `interrupt` --interrupt-after-ms after the first audio frame, then PASS/FAIL for:
                     `interrupted` within --interrupt-deadline-ms, no audio after it (watched 0.5 s), and
                     a second utterance on the same socket at once giving audio and `done`. Exit 0 only
                     if every check passes
  --bench            --parallel sockets at once, each --rounds streamed utterances in a row; p50/p90/p99/max
                     of first audio after the first text piece and after `finish`, mean RTF, audio-seconds
                     per wall-second, errors; --json FILE writes every utterance's numbers. Exit 1 if any
                     utterance failed

The voice: --voice-id (registered with POST /voices) or --prompt-wav FILE + --prompt-text TEXT (sent base64
in `start`); neither: the tests' fixture prompt. Times count from sending `start`; the client waits for
`started` before its first text piece. Total = `start` to `done`; RTF = total / audio seconds received.
Any `error` event, a timeout (--timeout per utterance) or the server closing the socket fails the utterance.
Audio is int16 PCM, 24 kHz, mono: --out (one utterance) and --out-dir (bench: one WAV per socket, its
rounds in order) write it as WAV.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from light_tts.audio_out import SAMPLE_RATE  # noqa: E402
# the same percentile as scripts/bench/benchmark.py, so the two load tests compare
from light_tts.tools.client_util import pcm_seconds, percentile, write_wav as _write_wav  # noqa: E402

PROMPT_WAV = os.path.join(ROOT, "tests", "fixtures", "prompt_en.wav")
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog."
TEXTS = {
    "en": "Hello, and thank you for calling. I can help you check the status of an order, change a delivery "
          "address, or answer questions about our products. Please tell me what you need, and I will do my "
          "best to help you right away.",
    "zh": "你好，欢迎使用语音合成服务。我可以帮你查询订单状态、修改收货地址，或者回答关于我们产品的问题。"
          "请告诉我你需要什么，我会尽快为你处理。",
}
GRACE_S = 0.5  # how long to keep watching for audio after `interrupted`
MAX_MESSAGE = 16 * 2**20  # largest frame accepted from the server (websockets' default is 1 MiB)
REQUEST_IDS = itertools.count()


class ConnectError(Exception):
    """The WebSocket could not be opened (refused, wrong key, no server)."""


@dataclass
class Result:
    """One utterance. Times are seconds since `start` was sent; None: it did not happen."""
    session: int = 0
    round: int = 0
    request_id: str = ""
    utterance: int | None = None  # the server's count on this socket, from `started`
    text_chars: int = 0
    pieces: int = 0
    started_s: float | None = None
    first_text_s: float | None = None
    finish_s: float | None = None
    first_audio_s: float | None = None
    interrupt_s: float | None = None
    interrupted_s: float | None = None
    end_s: float | None = None
    frames: int = 0
    samples: int = 0
    chunk_events: int = 0
    server_first_audio_ms: float | None = None  # the first `chunk` event's ms_since_first_text
    done: dict | None = None
    frames_after_interrupted: int = 0
    events_after_interrupted: list[str] = field(default_factory=list)
    frame_ms: list[float] = field(default_factory=list)  # arrival of each binary frame
    frame_samples: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # error events, timeouts, the socket closing: failures
    warnings: list[str] = field(default_factory=list)  # the server deviating from docs/websocket.md
    closed: bool = False  # the socket is gone
    pcm: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def ok(self) -> bool:
        return not self.errors and (self.done is not None or self.interrupted_s is not None)

    @property
    def audio_s(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def rtf(self) -> float | None:
        return self.end_s / self.audio_s if self.end_s is not None and self.samples else None

    @property
    def first_after_text_ms(self) -> float | None:
        return _ms_between(self.first_text_s, self.first_audio_s)

    @property
    def first_after_finish_ms(self) -> float | None:
        """Negative: the first audio came before `finish` was sent."""
        return _ms_between(self.finish_s, self.first_audio_s)

    @property
    def audio_before_finish(self) -> bool:
        return self.first_audio_s is not None and (self.finish_s is None or self.first_audio_s < self.finish_s)

    @property
    def interrupt_latency_ms(self) -> float | None:
        return _ms_between(self.interrupt_s, self.interrupted_s)

    @property
    def stall_ms(self) -> float | None:
        """How long a player starting at the first frame would have waited for audio in between."""
        if not self.frame_ms:
            return None
        play_end, stall = self.frame_ms[0], 0.0
        for t, n in zip(self.frame_ms, self.frame_samples):
            stall += max(0.0, t - play_end)
            play_end = max(play_end, t) + n / SAMPLE_RATE * 1e3
        return stall

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pcm"}
        for name in ("ok", "audio_s", "rtf", "first_after_text_ms", "first_after_finish_ms", "audio_before_finish",
                     "interrupt_latency_ms", "stall_ms"):
            out[name] = getattr(self, name)
        return out


def _ms_between(a: float | None, b: float | None) -> float | None:
    return (b - a) * 1e3 if a is not None and b is not None else None


# ---- one utterance -----------------------------------------------------------------------------------

def start_message(args, request_id: str) -> str:
    msg = {"type": "start", **args.voice, "request_id": request_id}
    if args.seed is not None:
        msg["seed"] = args.seed
    if args.max_speech_tokens is not None:
        msg["max_speech_tokens"] = args.max_speech_tokens
    return json.dumps(msg)


def split_text(text: str, piece_chars: int | None) -> list[str]:
    """The text as an LLM writes it: fixed-size pieces, cut anywhere; None: the whole text at once."""
    if not piece_chars:
        return [text]
    return [text[i:i + piece_chars] for i in range(0, len(text), piece_chars)]


def describe_close(e: ConnectionClosed) -> str:
    if e.rcvd is None:
        return "the connection dropped without a close frame (server gone or network failure)"
    reason = f", reason {e.rcvd.reason!r}" if e.rcvd.reason else ""
    hint = " (policy violation: wrong or missing --api-key?)" if e.rcvd.code == 1008 else ""
    return f"the server closed the socket: code {e.rcvd.code}{reason}{hint}"


def parse_event(res: Result, msg: str) -> dict | None:
    try:
        event = json.loads(msg)
    except ValueError:
        event = None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        res.warnings.append(f"text frame that is not a JSON event: {msg[:120]!r}")
        return None
    return event


def on_audio(res: Result, data: bytes, t: float, keep_audio: bool) -> None:
    if res.interrupted_s is not None:
        res.frames_after_interrupted += 1
        return
    if len(data) % 2:
        res.warnings.append(f"binary frame {res.frames} has an odd length ({len(data)} bytes): not int16 PCM")
    if res.first_audio_s is None:
        res.first_audio_s = t
    res.frames += 1
    res.samples += len(data) // 2
    res.frame_ms.append(round(t * 1e3, 2))
    res.frame_samples.append(len(data) // 2)
    if keep_audio:
        res.pcm += data


def on_chunk(res: Result, event: dict) -> None:
    index, samples = event.get("index"), event.get("samples")
    if index != res.chunk_events:
        res.warnings.append(f"`chunk` event index {index}, expected {res.chunk_events}")
    elif index >= len(res.frame_samples):
        res.warnings.append(f"`chunk` event {index} came before its binary frame")
    elif samples != res.frame_samples[index]:
        res.warnings.append(f"`chunk` event {index} says {samples} samples, its frame had {res.frame_samples[index]}")
    if res.server_first_audio_ms is None:
        res.server_first_audio_ms = event.get("ms_since_first_text")
    res.chunk_events += 1


def on_done(res: Result, event: dict) -> None:
    res.done = event
    if event.get("chunks") != res.frames:
        res.warnings.append(f"`done` says {event.get('chunks')} chunks, {res.frames} binary frames came")
    seconds = event.get("audio_seconds")
    if not isinstance(seconds, (int, float)) or abs(seconds - res.audio_s) > 1e-3:
        res.warnings.append(f"`done` says {seconds} audio seconds, {res.audio_s:.3f} s came")
    if not res.samples:
        res.errors.append("`done` without any audio")


def on_message(res: Result, msg: str | bytes, t: float, keep_audio: bool) -> bool:
    """Book one server message into res; True when it ends the utterance (`done` or `error`)."""
    if isinstance(msg, bytes):
        on_audio(res, msg, t, keep_audio)
        return False
    event = parse_event(res, msg)
    if event is None:
        return False
    kind = event["type"]
    if kind != "error" and None not in (event.get("utterance"), res.utterance) and event["utterance"] != res.utterance:
        res.warnings.append(f"ignored `{kind}` of utterance {event.get('utterance')} during {res.utterance}")
        return False
    if res.interrupted_s is not None:
        res.events_after_interrupted.append(kind)
    if kind == "error":
        res.errors.append(f"error event: status {event.get('status')}: {event.get('message')!r} "
                          f"(utterance {event.get('utterance')})")
    elif kind == "chunk":
        on_chunk(res, event)
    elif kind == "done":
        on_done(res, event)
    elif kind == "interrupted" and res.interrupted_s is None:
        res.interrupted_s = res.end_s = t
        if res.interrupt_s is None:
            res.warnings.append("`interrupted` although no interrupt was sent")
    else:
        res.warnings.append(f"unexpected `{kind}` event: {msg[:200]}")
    if kind in ("done", "error"):
        res.end_s = t
        return True
    return False


async def recv_until(ws: ClientConnection, deadline_s: float, t0: float) -> str | bytes | None:
    """The next message, or None once deadline_s (seconds after t0) has passed."""
    remaining = deadline_s - (time.perf_counter() - t0)
    if remaining <= 0:
        return None
    try:
        return await asyncio.wait_for(ws.recv(), remaining)
    except TimeoutError:
        return None


async def await_started(ws: ClientConnection, args, res: Result, t0: float) -> bool:
    """Wait for `started` (True) or an error / timeout (False); leftovers of an earlier utterance are skipped."""
    while True:
        msg = await recv_until(ws, args.timeout, t0)
        t = time.perf_counter() - t0
        if msg is None:
            res.errors.append(f"timeout: no `started` within --timeout {args.timeout:g} s")
            return False
        if isinstance(msg, bytes):
            res.warnings.append("audio frame before `started` (left over from an earlier utterance?): ignored")
            continue
        event = parse_event(res, msg)
        if event is None:
            continue
        if event["type"] == "started":
            res.started_s, res.utterance = t, event.get("utterance")
            if event.get("request_id") != res.request_id:
                res.warnings.append(f"`started` echoes request_id {event.get('request_id')!r}, "
                                    f"sent {res.request_id!r}")
            return True
        if event["type"] == "error":
            on_message(res, msg, t, False)
            return False
        res.warnings.append(f"`{event['type']}` before `started` (left over from an earlier utterance?): ignored")


def receive_deadline(args, res: Result) -> float:
    if res.interrupted_s is not None:
        return res.interrupted_s + GRACE_S
    if res.interrupt_s is not None:
        return max(args.timeout, res.interrupt_s + max(5.0, 3 * args.interrupt_deadline_ms / 1e3))
    return args.timeout


def timeout_message(args, res: Result) -> str:
    if res.interrupt_s is not None:
        waited = receive_deadline(args, res) - res.interrupt_s
        return f"timeout: no `interrupted` within {waited:.1f} s of sending `interrupt`"
    missing = "audio" if res.first_audio_s is None else "`done`"
    return f"timeout: no {missing} within --timeout {args.timeout:g} s ({res.audio_s:.2f} s of audio came)"


async def receive(ws: ClientConnection, args, res: Result, t0: float, first_audio: asyncio.Event) -> None:
    """Read until `done`, an error, the end of the watch after `interrupted`, or the timeout."""
    keep_audio = bool(args.out or args.out_dir)
    while True:
        msg = await recv_until(ws, receive_deadline(args, res), t0)
        if msg is None:
            if time.perf_counter() - t0 < receive_deadline(args, res):
                continue  # the deadline moved (an interrupt went out meanwhile)
            if res.interrupted_s is None:
                res.errors.append(timeout_message(args, res))
            return
        if on_message(res, msg, time.perf_counter() - t0, keep_audio):
            return
        if res.first_audio_s is not None:
            first_audio.set()


async def send_text(ws: ClientConnection, args, res: Result, t0: float, text: str, *, stream: bool,
                    finish: bool, stop: asyncio.Event) -> None:
    """Send the text (streamed: one piece per interval, on a fixed schedule), then `finish` unless stopped."""
    interval = args.piece_interval_ms / 1e3
    for i, piece in enumerate(split_text(text, args.piece_chars if stream else None)):
        if i:
            delay = res.first_text_s + i * interval - (time.perf_counter() - t0)
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, delay))
            except TimeoutError:
                pass
        if stop.is_set():
            return
        await ws.send(json.dumps({"type": "text", "text": piece}))
        res.pieces += 1
        if res.first_text_s is None:
            res.first_text_s = time.perf_counter() - t0
    if finish and not stop.is_set():
        await ws.send(json.dumps({"type": "finish"}))
        res.finish_s = time.perf_counter() - t0


async def interrupt_later(ws: ClientConnection, res: Result, t0: float, after_s: float, first_audio: asyncio.Event,
                          stop_text: asyncio.Event, sender: asyncio.Task) -> None:
    """after_s after the first audio frame: stop the text and send `interrupt` (the receiver keeps reading)."""
    await first_audio.wait()
    await asyncio.sleep(max(0.0, res.first_audio_s + after_s - (time.perf_counter() - t0)))
    stop_text.set()
    await asyncio.wait([sender])
    await ws.send(json.dumps({"type": "interrupt"}))
    res.interrupt_s = time.perf_counter() - t0


async def run_utterance(ws: ClientConnection, args, text: str, *, stream: bool,
                        interrupt_after: float | None = None) -> Result:
    """One utterance on an open socket: start, wait for started, send the text (whole, or streamed in pieces)
    and finish while receiving; with interrupt_after (seconds), interrupt that long after the first audio
    (and send no finish unless --interrupt-finish). Never raises for the server's doing: see Result.errors."""
    res = Result(request_id=f"ws_client-{os.getpid()}-{next(REQUEST_IDS)}", text_chars=len(text))
    stop_text, first_audio = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    try:
        await ws.send(start_message(args, res.request_id))
        if await await_started(ws, args, res, t0):
            finish = interrupt_after is None or args.interrupt_finish
            tasks.append(asyncio.create_task(send_text(ws, args, res, t0, text, stream=stream, finish=finish,
                                                       stop=stop_text)))
            if interrupt_after is not None:
                tasks.append(asyncio.create_task(interrupt_later(ws, res, t0, interrupt_after, first_audio,
                                                                 stop_text, tasks[0])))
            await receive(ws, args, res, t0, first_audio)
    except ConnectionClosed as e:
        res.errors.append(describe_close(e))
        res.closed = True
    finally:
        await stop_tasks(tasks, stop_text)
    for task in tasks:
        if not task.cancelled() and task.exception() and not isinstance(task.exception(), ConnectionClosed):
            res.errors.append(f"client error: {type(task.exception()).__name__}: {task.exception()}")
    if res.end_s is None:
        res.end_s = time.perf_counter() - t0
    return res


async def stop_tasks(tasks: list[asyncio.Task], stop_text: asyncio.Event) -> None:
    """The utterance is over: cancel the interrupter (no interrupt after the end), let the sender notice
    stop_text and return (cancelled after 1 s: a send stuck on a full buffer)."""
    stop_text.set()
    for task in tasks[1:]:
        task.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=1.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- sockets, output ---------------------------------------------------------------------------------

async def open_socket(args) -> ClientConnection:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    try:
        # PCM barely compresses: no permessage-deflate (CPU on both ends); no proxy from the environment
        return await connect(args.url, additional_headers=headers, max_size=MAX_MESSAGE, compression=None,
                             proxy=None, open_timeout=min(args.timeout, 30))
    except InvalidStatus as e:
        code = e.response.status_code
        hint = " (wrong or missing --api-key?)" if code in (401, 403) else ""
        raise ConnectError(f"{args.url}: the server refused the WebSocket upgrade with HTTP {code}{hint}") from None
    except ConnectionClosed as e:
        raise ConnectError(f"{args.url}: {describe_close(e)}") from None
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
        raise ConnectError(f"{args.url}: cannot connect: {type(e).__name__}: {e}") from None


def write_wav(path: str, pcm: bytes) -> None:
    _write_wav(path, pcm)
    print(f"wrote {path} ({pcm_seconds(len(pcm)):.2f} s)")


def fmt_ms(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.0f} ms"


def report_problems(res: Result, prefix: str = "", warnings: bool = True) -> None:
    for e in res.errors:
        print(f"{prefix}FAILED: {e}", flush=True)
    for w in res.warnings if warnings else ():
        print(f"{prefix}warning: {w}", flush=True)


def print_result(res: Result, title: str) -> None:
    before = ("-" if res.first_audio_s is None else "- (no finish sent)" if res.finish_s is None
              else "YES (streaming)" if res.audio_before_finish else "no")
    rows = [
        ("utterance (server's count)", f"{res.utterance}"),
        ("start -> started", fmt_ms(None if res.started_s is None else res.started_s * 1e3)),
        ("text sent", f"{res.text_chars} chars in {res.pieces} pieces"),
        ("first audio after first text", fmt_ms(res.first_after_text_ms)),
        ("  (server's ms_since_first_text)", fmt_ms(res.server_first_audio_ms)),
        ("first audio after finish", fmt_ms(res.first_after_finish_ms)),
        ("audio before finish was sent", before),
        ("chunks", f"{res.frames} binary frames, {res.chunk_events} `chunk` events"),
        ("audio", f"{res.audio_s:.2f} s"),
        ("total (start -> end)", "-" if res.end_s is None else f"{res.end_s:.2f} s"),
        ("RTF", "-" if res.rtf is None else f"{res.rtf:.3f}"),
        ("playback stalls after first audio", fmt_ms(res.stall_ms)),
        ("result", "ok" if res.ok else "FAILED"),
    ]
    print(f"{title}:")
    for name, value in rows:
        print(f"  {name:<36} {value}")
    report_problems(res, "  ")


# ---- modes -------------------------------------------------------------------------------------------

async def single_mode(args) -> int:
    async with await open_socket(args) as ws:
        res = await run_utterance(ws, args, args.text, stream=args.simulate_stream)
    mode = f"streamed, {args.piece_chars} chars every {args.piece_interval_ms:g} ms" if args.simulate_stream \
        else "whole text in one message"
    print_result(res, f"{args.url} ({mode})")
    if args.out:
        write_wav(args.out, res.pcm)
    return 0 if res.ok else 1


def interrupt_checks(args, first: Result) -> list[tuple[str, bool, str]]:
    deadline = args.interrupt_deadline_ms
    if first.interrupt_s is None:
        why = ("`done` came before the interrupt was due: use a longer --text or a smaller --interrupt-after-ms"
               if first.done else "; ".join(first.errors) or "no audio, so no interrupt was sent")
        return [("interrupt sent after the first audio", False, why)]
    in_flight = sum(1 for t in first.frame_ms if t > first.interrupt_s * 1e3)
    latency = first.interrupt_latency_ms
    after = f"{first.frames_after_interrupted} binary frames" + (
        f", events {first.events_after_interrupted}" if first.events_after_interrupted else "")
    return [
        ("interrupt sent after the first audio", True,
         f"{(first.interrupt_s - first.first_audio_s) * 1e3:.0f} ms after it; {in_flight} frames came in between "
         "it and `interrupted`"),
        (f"`interrupted` within {deadline:g} ms", latency is not None and latency <= deadline,
         "not received" + (" (`done` came instead)" if first.done else "") if latency is None
         else f"{latency:.0f} ms"),
        ("no audio after `interrupted`", latency is not None and not first.frames_after_interrupted
         and not first.events_after_interrupted, f"watched {GRACE_S:g} s: {after}" if latency is not None
         else "no `interrupted`"),
        ("no error in the interrupted utterance", not first.errors, "; ".join(first.errors) or "none"),
    ]


def reuse_check(first: Result, second: Result | None) -> tuple[str, bool, str]:
    name = "same socket, next utterance at once: audio and `done`"
    if second is None:
        return name, False, "the socket was closed after the first utterance"
    passed = second.ok and second.done is not None and second.samples > 0
    detail = f"utterance {second.utterance}: {second.frames} chunks, {second.audio_s:.2f} s, " + (
        "done" if second.done else "no done") + ("" if passed else f"; {'; '.join(second.errors)}")
    if first.utterance is not None and second.utterance != first.utterance + 1:
        second.warnings.append(f"`started` counts utterance {second.utterance} after {first.utterance}")
    return name, passed, detail


async def interrupt_mode(args) -> int:
    second = None
    async with await open_socket(args) as ws:
        first = await run_utterance(ws, args, args.text, stream=True, interrupt_after=args.interrupt_after_ms / 1e3)
        print_result(first, "utterance 1 (interrupted)")
        if not first.closed:
            second = await run_utterance(ws, args, args.text, stream=True)
    checks = interrupt_checks(args, first) + [reuse_check(first, second)]
    if second is not None:
        print_result(second, "utterance 2 (same socket)")
    print("\nchecks:")
    for name, passed, detail in checks:
        print(f"  {'PASS' if passed else 'FAIL'}  {name}: {detail}")
    if args.out:
        write_wav(args.out, first.pcm)
        if second is not None:
            root, ext = os.path.splitext(args.out)
            write_wav(f"{root}-second{ext or '.wav'}", second.pcm)
    return 0 if all(passed for _, passed, _ in checks) else 1


async def bench_session(args, index: int) -> list[Result]:
    """One socket, --rounds utterances in a row; after a failure the next round uses a fresh socket."""
    results, ws = [], None
    try:
        for r in range(args.rounds):
            if ws is None:
                try:
                    ws = await open_socket(args)
                except ConnectError as e:
                    res = Result(session=index, round=r, errors=[str(e)], closed=True)
                    results.append(res)
                    report_problems(res, f"[socket {index} round {r}] ")
                    continue
            res = await run_utterance(ws, args, args.text, stream=True)
            res.session, res.round = index, r
            results.append(res)
            report_problems(res, f"[socket {index} round {r}] ", warnings=False)
            if not res.ok:
                await ws.close()
                ws = None
    finally:
        if ws is not None:
            await ws.close()
    return results


def spread(values: list[float]) -> dict:
    return {"n": len(values), "p50": percentile(values, .5), "p90": percentile(values, .9),
            "p99": percentile(values, .99), "max": max(values) if values else float("nan")}


def bench_summary(results: list[Result], wall: float) -> dict:
    good = [r for r in results if r.ok]
    rtfs = [r.rtf for r in good if r.rtf is not None]
    audio = sum(r.audio_s for r in good)
    return {
        "utterances": len(results), "errors": len(results) - len(good), "wall_s": wall,
        "first_after_text_ms": spread([r.first_after_text_ms for r in good if r.first_after_text_ms is not None]),
        "first_after_finish_ms": spread([r.first_after_finish_ms for r in good
                                         if r.first_after_finish_ms is not None]),
        "total_ms": spread([r.end_s * 1e3 for r in good]),
        "audio_before_finish": sum(r.audio_before_finish for r in good),
        "mean_rtf": statistics.mean(rtfs) if rtfs else float("nan"),
        "audio_s": audio, "audio_per_s": audio / wall if wall > 0 else float("nan"),
    }


def bench_table(s: dict) -> str:
    num = lambda v: "-" if v != v else f"{v:.0f}"
    out = ["| ms (successful utterances) | p50 | p90 | p99 | max |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, key in (("first audio after first text", "first_after_text_ms"),
                       ("first audio after finish", "first_after_finish_ms"), ("total, start -> done", "total_ms")):
        d = s[key]
        out.append(f"| {label} | {num(d['p50'])} | {num(d['p90'])} | {num(d['p99'])} | {num(d['max'])} |")
    ok = s["utterances"] - s["errors"]
    out += ["", "| utterances | errors | audio before finish | mean RTF | audio s | wall s | audio s/s |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {s['utterances']} | {s['errors']} | {s['audio_before_finish']}/{ok} | {s['mean_rtf']:.3f} | "
            f"{s['audio_s']:.1f} | {s['wall_s']:.1f} | {s['audio_per_s']:.2f} |"]
    return "\n".join(out)


async def bench_mode(args) -> int:
    print(f"bench: {args.url}, {args.parallel} sockets x {args.rounds} rounds, {len(args.text)} chars streamed "
          f"{args.piece_chars} every {args.piece_interval_ms:g} ms", flush=True)
    t0 = time.perf_counter()
    sessions = await asyncio.gather(*(bench_session(args, i) for i in range(args.parallel)))
    wall = time.perf_counter() - t0
    results = [r for session in sessions for r in session]
    for index, session in enumerate(sessions if args.out_dir else ()):
        write_wav(os.path.join(args.out_dir, f"session-{index:03d}.wav"), b"".join(r.pcm for r in session))
    summary = bench_summary(results, wall)
    print()
    print(bench_table(summary))
    warnings = Counter(w for r in results for w in r.warnings)
    for w, n in warnings.most_common(10):
        print(f"warning ({n} utterances): {w}")
    if args.json:
        public = {k: v for k, v in vars(args).items() if k not in ("voice", "api_key")}
        with open(args.json, "w") as f:
            json.dump({"args": public, "summary": summary, "utterances": [r.to_json() for r in results]}, f,
                      indent=1, ensure_ascii=False)
        print(f"wrote {args.json}")
    return 0 if summary["errors"] == 0 else 1


# ---- command line ------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1].split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--simulate-stream", action="store_true", help="feed the text in pieces, like an LLM")
    mode.add_argument("--test-interrupt", action="store_true", help="barge-in check (PASS/FAIL, exit status)")
    mode.add_argument("--bench", action="store_true", help="load benchmark: --parallel sockets x --rounds")
    p.add_argument("--url", default="ws://127.0.0.1:8080/ws/tts")
    p.add_argument("--api-key", default=os.environ.get("LIGHTTTS_API_KEY"),
                   help="sent as Authorization: Bearer (default: $LIGHTTTS_API_KEY)")
    voice = p.add_mutually_exclusive_group()
    voice.add_argument("--voice-id", help="a voice registered with POST /voices")
    voice.add_argument("--prompt-wav", help=f"prompt recording, sent base64 (default without --voice-id: "
                                            f"{os.path.relpath(PROMPT_WAV, ROOT)})")
    p.add_argument("--prompt-text", help="the prompt recording's transcript (needed with --prompt-wav)")
    p.add_argument("--text", help="what to say (default: a ~40-word sentence in --lang)")
    p.add_argument("--lang", choices=sorted(TEXTS), default="en", help="language of the default --text")
    p.add_argument("--seed", type=int, help="`start` seed: reproducible sampling")
    p.add_argument("--max-speech-tokens", type=int, help="`start` max_speech_tokens: cap after finish")
    # a hang detector, not a speed target (--bench reports the times): the server's own --request_timeout
    # default, so a loaded machine's slow utterance is not a failure
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per utterance, start to done, before it "
                                                                 "counts as hung")
    p.add_argument("--out", help="write the audio received as a WAV (--test-interrupt: also NAME-second.wav)")
    p.add_argument("--out-dir", help="bench: one WAV per socket (its rounds in order) here")
    p.add_argument("--json", help="bench: write the summary and every utterance's numbers here")
    p.add_argument("--piece-chars", type=int, default=4, help="streamed text: characters per `text` message")
    p.add_argument("--piece-interval-ms", type=float, default=30.0, help="streamed text: time between pieces")
    p.add_argument("--interrupt-after-ms", type=float, default=300.0, help="interrupt this long after first audio")
    p.add_argument("--interrupt-deadline-ms", type=float, default=2000.0,
                   help="`interrupted` must come this soon after `interrupt`")
    p.add_argument("--interrupt-finish", action="store_true",
                   help="--test-interrupt: send finish after the last piece (interrupt while the rest is spoken) "
                        "instead of leaving the utterance waiting for more text")
    p.add_argument("--parallel", type=int, default=1, help="bench: concurrent sockets")
    p.add_argument("--rounds", type=int, default=1, help="bench: utterances per socket, one after another")
    a = p.parse_args(argv)
    if a.text is None:
        a.text = TEXTS[a.lang]
    if not a.text:
        p.error("--text is empty")
    if a.parallel < 1 or a.rounds < 1 or a.piece_chars < 1 or a.piece_interval_ms < 0 or a.timeout <= 0:
        p.error("need --parallel, --rounds, --piece-chars >= 1, --piece-interval-ms >= 0, --timeout > 0")
    if a.out_dir and not a.bench:
        p.error("--out-dir is for --bench; use --out")
    if a.out and a.bench:
        p.error("--bench writes --out-dir DIR (one WAV per socket), not --out")
    if a.json and not a.bench:
        p.error("--json is for --bench")
    a.voice = voice_fields(p, a)
    return a


def voice_fields(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    if a.voice_id:
        if a.prompt_text:
            p.error("--prompt-text goes with --prompt-wav, not --voice-id")
        return {"voice_id": a.voice_id}
    if a.prompt_wav and not a.prompt_text:
        p.error("--prompt-wav needs --prompt-text (its transcript)")
    path, text = (a.prompt_wav, a.prompt_text) if a.prompt_wav else (PROMPT_WAV, a.prompt_text or PROMPT_TEXT)
    try:
        with open(path, "rb") as f:
            audio = f.read()
    except OSError as e:
        p.error(f"--prompt-wav {path}: {e.strerror}")
    return {"prompt_text": text, "prompt_wav": base64.b64encode(audio).decode()}


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = bench_mode if args.bench else interrupt_mode if args.test_interrupt else single_mode
    try:
        return asyncio.run(mode(args))
    except ConnectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
