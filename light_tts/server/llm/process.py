"""The LLM stage process: LLMReq in, speech tokens out to the decode processes (DESIGN §2, §4).

    encode ──LLMReq, TextTokensReq──> [recv_from_peers]  LLM
    HTTP   ──AbortReq──────────────>
    decode ──YieldGpuReq───────────>
    LLM [send_to_decode[i]] ──DecodeStartReq, SpeechTokensBatchOutput, AbortReq──> decode i
    LLM [send_to_http]      ──ErrorOutput──> the HTTP worker named by reply_to

The launcher (light_tts.server.backend) starts run_llm_process in a 'spawn' process.

The loop (run_forever): take every waiting message (Dispatcher: handle_llm_req, handle_text,
handle_abort), run one engine step, send its results (process_result), publish stats; block on the
socket only when the engine had nothing to run.

Routing: the first time a request is admitted it is given to the decode process with the fewest
active requests assigned by this process (ties: lowest index), and that decoder gets
`llm_req.decode` (the DecodeStartReq) at once, before the step's tokens. The step's tokens then
go out as ONE SpeechTokensBatchOutput per decoder (a row per request of that decoder with new
tokens), after every DecodeStartReq of the step on the same PUSH socket, which keeps them in
order. A request counts against its decoder until its LLM side ends (finished, aborted or
failed), not until its audio is out: an approximation of the decoder's real queue depth that
needs no message back from the decoders.

First chunks first across the GPU (--first_chunk_priority): a decode process on the LLM's GPU says
when it starts and ends a call that computes first chunks of streams (YieldGpuReq). While such a
call runs, the engine's steps leave out the streams whose first chunk has started (they have audio
coming; their later tokens can wait a few tens of ms), so the first chunk does not share the GPU
with the rest of the sentences it belongs to (at one stream, all of the LLM's work). Requests
still short of their first chunk, and non-streaming ones, keep stepping. A call's yield lasts at
most YIELD_MAX_S even if its end never comes (a decoder that failed mid-call).

Abort: the request leaves the waiting queue or the running batch at once (its KV slots are freed)
and nothing more is sent for it but an AbortReq to its decoder, if it had one: an abort may come
from the encode stage alone (a bistream request whose text failed there), which no decode process
hears of otherwise; a decoder drops a second abort (the HTTP worker's) as unknown. An abort that
arrives before its LLMReq (the HTTP worker gave up while the encode stage was still busy) is
remembered, and the LLMReq is then dropped.

Errors: a message whose handler raises, and a request the engine fails (StepResult.errors), fail
that request by the Dispatcher's rule (light_tts.server.stage): ErrorOutput(stage="llm") to its
reply_to; drop_request frees it in the engine and sends AbortReq(rid) to its decoder (if it had
one) so the decoder frees what it holds. Every other request goes on.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from typing import Optional

import zmq

from light_tts.server.io_struct import (AbortReq, ErrorOutput, LLMReq, RequestError, SpeechTokensBatchOutput,
                                        TextTokensReq, YieldGpuReq, drain, sock_send)
from light_tts.server.gpu_memory import allocator_stats
from light_tts.server.ipc import Endpoints, ReplySockets, bind_pull, connect_push, write_stats
from light_tts.server.llm.engine import LLMEngine, Sequence, StepResult
from light_tts.server.stage import STATS_SECONDS, Dispatcher, Ticker

log = logging.getLogger("lighttts")

IDLE_POLL_MS = 100          # how long an idle loop blocks on its socket
EARLY_ABORTS_KEPT = 4096    # aborts for rids not seen yet, remembered (oldest forgotten first)
IDLE_LOG_SECONDS = 300      # an unchanged stats line (an idle server) is logged at most this often
YIELD_MAX_S = 1.0           # longest hold of one YieldGpuReq whose end does not come (module doc)
NOTHING_HELD: frozenset = frozenset()


class LLMServer:
    def __init__(self, args, endpoints: Endpoints, llm):
        self.args = args
        self.endpoints = endpoints
        self.engine = LLMEngine.from_args(llm, args)
        self.init_sockets()
        self.dispatch = Dispatcher("llm", {LLMReq: self.handle_llm_req, TextTokensReq: self.handle_text,
                                           AbortReq: self.handle_abort, YieldGpuReq: self.handle_yield},
                                   reply=self.reply, drop=self.drop_request)
        self.decode_load = [0] * endpoints.decode_num   # active requests per decoder (see module doc)
        self.decoder_of: dict[str, int] = {}
        self.early_aborts: OrderedDict[str, None] = OrderedDict()
        self.first_chunk_started: set[str] = set()   # streams whose first chunk a decoder has begun
        self.yield_until: dict[int, float] = {}      # decoder -> time.monotonic() its yield lapses
        self.counters = dict(steps=0, prefill_steps=0, decode_steps=0, prefill_tokens=0, generated_tokens=0,
                             last_batch_size=0, max_batch_size=0, aborted=0, rejected=0, finished=0,
                             gpu_yields=0, held_steps=0)
        self.stats_ticker = Ticker(STATS_SECONDS)
        self.log_ticker = Ticker(args.log_stats_interval)
        self.idle_log_ticker = Ticker(IDLE_LOG_SECONDS)   # an unchanged stats line is logged this rarely
        self.last_stats_line = ""

    def init_sockets(self) -> None:
        self.ctx = zmq.Context()
        self.recv_from_peers = bind_pull(self.ctx, self.endpoints.llm)   # encode (LLMReq), HTTP (AbortReq)
        self.send_to_decode = [connect_push(self.ctx, self.endpoints.decode(i))
                               for i in range(self.endpoints.decode_num)]
        self.send_to_http = ReplySockets(self.ctx)                          # by reply_to, opened on first use

    # ---- the loop -----------------------------------------------------------------------------

    def run_forever(self) -> None:
        idle = True
        while True:
            self.recv_requests(block=idle)
            started = time.time()
            held = self.held()
            res = self.engine.step(hold=held) if (self.engine.running or self.engine.waiting) else None
            if res is not None:
                self.counters["held_steps"] += bool(held)
                self.process_result(res, started)
            # nothing ran (no requests, or only bistream ones waiting for text): only a message can
            # change that, so block on the socket instead of spinning
            idle = res is None or (res.kind == "idle" and not (res.outputs or res.admitted or res.errors))
            if self.stats_ticker.due():
                self.publish_stats()

    def recv_requests(self, block: bool = False) -> None:
        if block:   # while yielding, wake when the yield lapses at the latest
            wait_ms = IDLE_POLL_MS
            if self.yield_until:
                lapse_ms = int((min(self.yield_until.values()) - time.monotonic()) * 1000) + 1
                wait_ms = max(1, min(wait_ms, lapse_ms))
            self.recv_from_peers.poll(wait_ms)
        for msg in drain(self.recv_from_peers):
            self.dispatch(msg)

    def reply(self, reply_to: str, msg) -> None:
        self.send_to_http.send(reply_to, msg)

    def drop_request(self, rid: str) -> Optional[str]:
        """Dispatcher hook for a failed request: free it in the engine and in its decoder; returns
        its reply address if the engine still held it."""
        seq = self.engine.abort(rid)
        self.free_in_decoder(rid)
        return seq.req.reply_to if seq is not None else None

    def free_in_decoder(self, rid: str) -> None:
        """Tell the request's decoder (if it has one) to drop what it holds; stop counting it there."""
        i = self.decoder_of.get(rid)
        if i is not None:
            sock_send(self.send_to_decode[i], AbortReq(rid=rid))
        self.release_decoder(rid)

    # ---- handlers -----------------------------------------------------------------------------

    def handle_llm_req(self, req: LLMReq) -> None:
        if req.rid in self.early_aborts:
            del self.early_aborts[req.rid]
            self.counters["aborted"] += 1
            return
        reason = "duplicate request id" if self.engine.has(req.rid) else self.engine.check(req)
        if reason is not None:
            self.counters["rejected"] += 1
            log.info("rejected %s: %s", req.rid, reason)
            self.reply(req.reply_to, ErrorOutput(rid=req.rid, status=400, message=reason, stage="llm"))
            return
        self.engine.add(req)

    def handle_text(self, msg: TextTokensReq) -> None:
        if not self.engine.add_text(msg.rid, msg.tokens, msg.finish):
            log.debug("text for %s dropped: the request has ended", msg.rid)

    def handle_yield(self, msg: YieldGpuReq) -> None:
        if not msg.running:
            self.yield_until.pop(msg.decoder, None)
            return
        self.first_chunk_started.update(rid for rid in msg.rids if self.engine.has(rid))
        self.yield_until[msg.decoder] = time.monotonic() + YIELD_MAX_S
        self.counters["gpu_yields"] += 1

    def held(self):
        """The rids the next step leaves out: streams past their first chunk while a decoder on this
        GPU computes first chunks, else none."""
        if not self.yield_until:
            return NOTHING_HELD
        now = time.monotonic()
        for i in [i for i, lapse in self.yield_until.items() if lapse <= now]:
            del self.yield_until[i]   # its end never came: stop yielding
        return self.first_chunk_started if self.yield_until else NOTHING_HELD

    def handle_abort(self, msg: AbortReq) -> None:
        seq = self.engine.abort(msg.rid)
        if seq is None:
            self.early_aborts[msg.rid] = None
            while len(self.early_aborts) > EARLY_ABORTS_KEPT:
                self.early_aborts.popitem(last=False)
            return
        self.counters["aborted"] += 1
        self.free_in_decoder(msg.rid)

    # ---- outputs ------------------------------------------------------------------------------

    def route(self, seq: Sequence) -> None:
        """Give a newly admitted request to the least-loaded decoder; its DecodeStartReq goes first."""
        i = min(range(len(self.decode_load)), key=lambda j: (self.decode_load[j], j))
        self.decode_load[i] += 1
        self.decoder_of[seq.rid] = i
        sock_send(self.send_to_decode[i], seq.req.decode)

    def process_result(self, res: StepResult, started: float) -> None:
        """Route the step's outputs; `started`: time.time() when the step began (prefill marks)."""
        now = time.time()
        for seq in res.admitted:  # its DecodeStartReq goes before any of its tokens
            if res.kind == "prefill":   # admitted and prefilled (first token drawn) in this step
                seq.req.decode.marks.update(prefill_start=started, prefill_done=now)
            self.route(seq)
        batches: dict[int, SpeechTokensBatchOutput] = {}   # decoder -> this step's rows for it
        for out in res.outputs:
            i = self.decoder_of[out.rid]
            batch = batches.get(i)
            if batch is None:
                batch = batches[i] = SpeechTokensBatchOutput()
            batch.append(out)
            self.counters["generated_tokens"] += len(out.tokens)
        for i, batch in batches.items():
            sock_send(self.send_to_decode[i], batch)
        for seq in res.finished:
            self.release_decoder(seq.rid)
        self.counters["finished"] += len(res.finished)
        for seq, message, status in res.errors:   # the engine has dropped these already
            log.error("request %s failed: %s", seq.rid, message)
            self.dispatch.fail(seq.rid, RequestError(status, message), seq.req.reply_to)
        if res.kind == "idle":
            return
        self.counters["steps"] += 1
        self.counters[f"{res.kind}_steps"] += 1
        self.counters["prefill_tokens"] += res.prefill_tokens
        self.counters["last_batch_size"] = res.batch_size
        self.counters["max_batch_size"] = max(self.counters["max_batch_size"], res.batch_size)

    def release_decoder(self, rid: str) -> None:
        self.first_chunk_started.discard(rid)
        i = self.decoder_of.pop(rid, None)
        if i is not None:
            self.decode_load[i] -= 1

    # ---- stats --------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Published for /metrics: running, waiting, batch_size (requests in the last forward),
        max_batch_size, kv_used (slots held by requests), kv_total, generated_tokens, aborted,
        rejected, errors, and the engine's details (kv_free, kv_cached = unreferenced prefix-cache
        slots, prefix_hits / prefix_misses, paused, ...)."""
        return dict(running=len(self.engine.running), waiting=len(self.engine.waiting),
                    batch_size=self.counters["last_batch_size"], errors=self.dispatch.errors, **self.counters,
                    **self.engine.stats(), decode_load=list(self.decode_load), **allocator_stats())

    def publish_stats(self) -> None:
        s = self.stats()
        write_stats(self.endpoints, "llm", s)
        if self.args.disable_log_stats or not self.log_ticker.due():
            return
        line = stats_line(s)
        # an idle server repeats itself: log a line that changed, the same one only now and then
        if line != self.last_stats_line or self.idle_log_ticker.due():
            log.info("%s", line)
            self.last_stats_line = line


def stats_line(s: dict) -> str:
    """The LLM's stats log line. It names errors only when there are some: operators grep logs for
    'error', and 'errors 0' on every line matched them all."""
    line = ("running %d waiting %d batch_size %d (max %d) steps %d tokens %d kv %d/%d (cached %d) prefix hits %d "
            "misses %d finished %d aborted %d rejected %d paused %d decode_load %s"
            % (s["running"], s["waiting"], s["batch_size"], s["max_batch_size"], s["steps"], s["generated_tokens"],
               s["kv_used"], s["kv_total"], s["kv_cached"], s["prefix_hits"], s["prefix_misses"], s["finished"],
               s["aborted"], s["rejected"], s["paused"], s["decode_load"]))
    return line + (f" errors {s['errors']}" if s["errors"] else "")


def run_llm_process(args, endpoints: Endpoints) -> None:
    """Entry point of the LLM stage (a fresh 'spawn' process; `args` from server.args.parse_args)."""
    from light_tts.server.stage import stage_device, stage_dtype, start_stage
    hb = start_stage(endpoints, "llm", args.log_level)
    import torch
    from light_tts.models.pretrained import load_model
    from light_tts.server.gpu_memory import cap_memory_or_exit, log_reserved, out_of_memory_hint

    device = stage_device(0)
    if device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    plan = cap_memory_or_exit(args, "llm", device)   # --gpu_memory_limit_gb, before any allocation
    t0 = time.perf_counter()
    try:
        # the directory's family: Qwen2LM (CosyVoice2) or CosyVoice3LM (the engine asks the model what differs)
        model = load_model(args.model_dir, device, stage_dtype(args.data_type, device), components=("llm",))
        server = LLMServer(args, endpoints, model.llm)
    except torch.cuda.OutOfMemoryError:
        log.error("%s", out_of_memory_hint(args, "llm", plan))
        raise SystemExit(2)
    log.info("LLM ready on %s (%s) in %.1f s; KV pool %d tokens (%.0f MiB%s), up to %d requests, "
             "%d CUDA graph(s), %s sampler, %d decoder(s)", device, model.dtype, time.perf_counter() - t0,
             args.max_total_token_num, server.engine.pool.bytes() / 2**20, ", int8" if server.engine.pool.int8 else "",
             args.running_max_req_size, server.engine.stats()["cuda_graphs"], server.engine.sampler.mode,
             endpoints.decode_num)
    log_reserved("llm", device, plan)
    hb.ready()
    server.run_forever()
