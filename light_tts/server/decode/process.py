"""Decode stage: speech tokens -> 24 kHz PCM16 chunks, sent straight to the asking HTTP worker.

    LLM  ──DecodeStartReq, SpeechTokensBatchOutput, AbortReq──> [recv_from_peers]  decode i
    HTTP ──AbortReq──────────────────────────────────────────>
    decode i [send_to_http] ──AudioOutput, ErrorOutput──> the HTTP worker named by reply_to
    decode i [send_to_llm]  ──YieldGpuReq──> LLM   (--first_chunk_priority, on the LLM's GPU only)

One process per `--decode_process_num`; decode i runs on GPU i % num_gpus (CPU when none). From
the LLM, over one PUSH socket and so in order, it gets a request's DecodeStartReq before any of
its tokens, and at most one SpeechTokensBatchOutput per LLM step: a row of new tokens per request
(handle_tokens walks the rows; a bad row fails only its own request, by the Dispatcher's rule in
light_tts.server.stage, as does a bad message: ErrorOutput 500 "decode failed: ...", state dropped).

Per request it keeps the conditioning and a queue of sentences, each a StreamingDecoder over a
fresh Token2Wav (the official decodes every sentence with its own tts() call: new HiFT cache,
same seed). The loop: take every waiting message, then compute the next chunk of up to
--decode_max_batch_size ready requests in ONE batched flow call and ONE batched HiFT call
(light_tts.server.decode.engine; served requests move to the back so none starves; waiting first chunks
run before the later chunks of streams with audio to spare: pick_batch; CosyVoice3's causal HiFT runs
per row after the batched flow), send each chunk
as soon as it exists, and block on the socket only when nothing is ready. With --first_chunk_priority
a decode process on the LLM's GPU tells the LLM when a call with first chunks of streams starts and
ends (YieldGpuReq), and the LLM holds back the streams past their first chunk meanwhile
(light_tts.server.llm.process), unless a stream still waiting for tokens has less than
URGENT_SLACK_S of audio buffered (back-to-back first-chunk calls must not starve it).

The launcher (light_tts.server.backend) starts run_decode_process in a 'spawn' process. torch and
the model code are imported inside functions: the launcher imports this module only to
name the entry point and must stay light.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import zmq

from light_tts.audio_out import SAMPLE_RATE, pcm16_bytes
from light_tts.server.io_struct import (AbortReq, AudioOutput, DecodeStartReq, SpeechTokensBatchOutput, YieldGpuReq,
                                        drain, sock_send)
from light_tts.server.gpu_memory import allocator_stats
from light_tts.server.ipc import Endpoints, ReplySockets, bind_pull, connect_push, write_stats
from light_tts.server.stage import STATS_SECONDS, Dispatcher, Ticker, start_stage, stage_dtype

log = logging.getLogger("lighttts")

POLL_MS = 100              # longest block on the socket while idle
ABORT_MEMORY_SECONDS = 30.0  # an abort may overtake its DecodeStartReq (different senders): remember it
# A stream with less audio buffered at its client than this joins a batch of first chunks (below).
URGENT_SLACK_S = 1.0


# Capacities of the two caches of convolution set-ups on the CPU (PyTorch's mkldnn path), read by
# the libraries once, at their first convolution. Both default to 1024 entries and add one for
# every new input shape, and decode shapes hardly repeat (prompt + chunk tokens, batch rows). Each
# entry keeps some tens of KiB of C heap alive for hundreds of requests, between the chunk tensors,
# so glibc can neither merge nor return the freed tensor memory around it: a 10-minute CPU soak grew
# decode RSS by 220-290 MiB (in scripts/bench/decode_mem_probe.py, mallinfo2 showed +60 MiB held by the
# caches and the rest free but fragmented). With 128 entries (more than one engine call's own
# convolutions, which the 10 Euler steps reuse) the heap stays flat for about 1.5% more CPU, and
# the audio is the same (an entry only saves set-up time). docs/reliability.md, "Soak", has the runs.
# A value already in the environment wins.
CPU_CACHE_ENV = {
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128",   # oneDNN: created primitives (JIT-compiled kernels)
    "LRU_CACHE_CAPACITY": "128",                # ideep: (de)convolution primitive descriptors, per thread
}


def bound_cpu_caches(environ=None) -> dict:
    """Set CPU_CACHE_ENV where the environment does not say otherwise; before torch runs anything."""
    environ = os.environ if environ is None else environ
    for name, value in CPU_CACHE_ENV.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in CPU_CACHE_ENV}


def cpu_threads() -> int:
    """Torch intra-op threads of a decode process on CPU: few, the other stages need cores too."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


@dataclass
class DecodeState:
    """One request: its conditioning and its sentences still to be turned into audio."""
    req: DecodeStartReq
    pieces: deque = field(default_factory=deque)   # StreamingDecoder per sentence, oldest first
    piece: int = 0                                 # index of the sentence tokens now arrive for
    input_done: bool = False                       # the LLM sent finished=True
    first_audio_at: Optional[float] = None         # time.monotonic() of its first audio (sent with req.marks)
    audio_out_s: float = 0.0                       # seconds of audio sent so far
    voice: Optional[bytes] = None                  # Token2Wav.conditioning_key (only with the prompt cache)

    @property
    def ready(self) -> bool:
        return bool(self.pieces) and self.pieces[0].ready

    @property
    def audio_sent(self) -> bool:
        return self.first_audio_at is not None

    @property
    def complete(self) -> bool:
        return self.input_done and not self.pieces

    def slack(self, now: float) -> float:
        """Seconds of audio its client holds beyond real-time playback since the first chunk."""
        return self.audio_out_s - (now - self.first_audio_at)


def pick_batch(ready: list, max_batch_size: int, now: float) -> list:
    """The requests whose next chunk runs now, from those with one ready (round-robin order).

    First chunks set the first-audio latency, and a batch costs what its longest row costs (every
    later chunk re-runs the prompt and the sentence so far), so while first chunks wait they run
    without the later chunks of running streams, except streams about to run dry (less than
    URGENT_SLACK_S of audio buffered), which go first. Otherwise every ready request runs.
    Non-streaming requests are never held back: their client waits for all of their audio."""
    fresh = [s for s in ready if not s.audio_sent or not s.req.stream]
    if not fresh:
        return ready[:max_batch_size]
    streams = [s for s in ready if s.audio_sent and s.req.stream]
    urgent = sorted((s for s in streams if s.slack(now) < URGENT_SLACK_S), key=lambda s: s.slack(now))
    return (urgent + fresh)[:max_batch_size]


class DecodeServer:
    def __init__(self, endpoints: Endpoints, index: int, flow, hift, ctx: Optional[zmq.Context] = None,
                 engine=None, max_batch_size: int = 16, first_hop: int = 0, yield_to_llm: bool = False):
        self.stage = f"decode:{index}"
        self.index = index
        self.endpoints = endpoints
        self.max_batch_size = max_batch_size
        self.init_model(flow, hift, engine, first_hop)
        self.init_sockets(ctx or zmq.Context.instance(), endpoints.decode(index), yield_to_llm)
        self.init_state()

    def init_model(self, flow, hift, engine, first_hop: int) -> None:
        from light_tts.server.decode.engine import DecodeEngine
        from light_tts.models.token2wav import StreamSchedule
        self.flow, self.hift = flow, hift
        self.engine = engine or DecodeEngine(flow, hift)
        self.schedule = StreamSchedule(pre_lookahead_len=flow.pre_lookahead_len, first_hop_len=first_hop)
        self.batch_sizes: dict[int, int] = {}          # rows per engine call -> calls (stats)

    def init_sockets(self, ctx: zmq.Context, addr: str, yield_to_llm: bool) -> None:
        self.ctx = ctx
        self.recv_from_peers = bind_pull(ctx, addr)
        self.send_to_http = ReplySockets(self.ctx)                          # by reply_to, opened on first use
        # first chunks first across a GPU shared with the LLM (--first_chunk_priority): YieldGpuReq
        self.send_to_llm = connect_push(ctx, self.endpoints.llm) if yield_to_llm else None

    def init_state(self) -> None:
        self.states: dict[str, DecodeState] = {}        # insertion order = arrival order
        self.aborted: dict[str, float] = {}             # rid -> time of an abort without state
        # (rid, Token2Wav) of new streaming requests whose voice may not be cached (newest kept)
        self.to_warm: deque = deque(maxlen=4 * self.max_batch_size)
        self.dispatch = Dispatcher(self.stage, {
            DecodeStartReq: self.handle_start, SpeechTokensBatchOutput: self.handle_tokens,
            AbortReq: self.handle_abort}, reply=self.reply, drop=self.drop_request)
        self.chunks = 0
        self.audio_seconds = 0.0
        self.aborted_count = 0
        self.stats_ticker = Ticker(STATS_SECONDS)

    # ---- loop --------------------------------------------------------------------------------

    def run_forever(self) -> None:
        while True:
            self.step(block=True)

    def step(self, block: bool = False) -> None:
        """One loop iteration: messages, then ready chunks, then (if idle) wait for messages."""
        for msg in drain(self.recv_from_peers):
            self.dispatch(msg)
        batch = self.schedule_batch()
        if batch:
            self.process_results(self.run_chunks(batch))
        elif self.to_warm:
            self.warm_prompts()
        self.finish_completed()
        if self.stats_ticker.due():
            self.forget_old_aborts()
            self.publish_stats()
        if block and not batch and not self.to_warm:
            self.recv_from_peers.poll(POLL_MS)

    def schedule_batch(self) -> list[DecodeState]:
        """Up to max_batch_size requests with a chunk ready, one chunk each (pick_batch), in state
        order (served requests are moved to the back in process_results, so that order is round robin)."""
        return pick_batch([s for s in self.states.values() if s.ready], self.max_batch_size, time.monotonic())

    def run_chunks(self, batch: list[DecodeState]) -> list[tuple[DecodeState, object]]:
        """Compute the next chunk of every request in `batch` with one batched engine call:
        (state, float32 audio | None | exception) per request."""
        results, rows, owners = [], [], []
        for state in batch:
            try:
                chunk = state.pieces[0].next_chunk()
            except Exception as e:
                results.append((state, e))
                continue
            if chunk is None:
                results.append((state, None))   # a sentence without tokens
            else:
                rows.append((state.pieces[0].t2w, chunk))
                owners.append(state)
        if rows:
            self.batch_sizes[len(rows)] = self.batch_sizes.get(len(rows), 0) + 1
            first = [s.req.rid for s in owners if s.req.stream and not s.audio_sent] \
                if self.send_to_llm and not self.streams_short_of_audio(time.monotonic()) else []
            self.yield_gpu(first, running=True)
            started = time.time()
            try:
                outs = self.engine.run(rows)
            except Exception as e:  # the batch failed as a whole: fail its requests, keep serving
                outs = [e] * len(rows)
            done = time.time()
            self.yield_gpu(first, running=False)
            for state in owners:
                if not state.audio_sent:
                    state.req.marks.update(decode_start=started, decode_done=done)
            results.extend(zip(owners, outs))
        return results

    def streams_short_of_audio(self, now: float) -> bool:
        """Whether a stream with more tokens to come has less than URGENT_SLACK_S of audio buffered:
        then the LLM must not hold back its tokens for other requests' first chunks (no yield)."""
        return any(s.audio_sent and s.req.stream and not s.input_done and s.slack(now) < URGENT_SLACK_S
                   for s in self.states.values())

    def yield_gpu(self, first: list, running: bool) -> None:
        """Tell the LLM that a call with these streams' first chunks starts or has ended (nothing
        when there are none). A hint: never block on it (an LLM that is gone must not stop decode)."""
        if not first:
            return
        try:
            sock_send(self.send_to_llm, YieldGpuReq(decoder=self.index, rids=first, running=running), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("YieldGpuReq not sent: %s", e)

    def warm_prompts(self) -> None:
        """Idle: cache the prompt frames of the voices of new streaming requests now, while the LLM
        makes their first tokens, so that their first chunk computes only its own frames
        (decode/prompt_cache.py). A failure here only costs that later (the chunk fills it)."""
        t2ws = []
        while self.to_warm and len(t2ws) < self.max_batch_size:
            rid, t2w = self.to_warm.popleft()
            if rid in self.states:   # not finished, failed or aborted meanwhile
                t2ws.append(t2w)
        if not t2ws:
            return
        try:
            self.engine.warm_prompts(t2ws)
        except Exception as e:
            log.warning("prompt cache warm-up failed: %s", e, exc_info=log.isEnabledFor(logging.DEBUG))

    def process_results(self, results) -> None:
        for state, out in results:
            rid = state.req.rid
            if self.states.get(rid) is not state:
                continue  # aborted meanwhile
            if isinstance(out, Exception):
                self.dispatch.fail(rid, out, state.req.reply_to)
                continue
            if state.pieces[0].done:
                state.pieces.popleft()
            self.states[rid] = self.states.pop(rid)   # to the back: round robin under a full batch
            if out is not None and len(out):
                self.chunks += 1
                self.audio_seconds += len(out) / SAMPLE_RATE
                marks = None if state.audio_sent else state.req.marks
                if not state.audio_sent:
                    state.first_audio_at = time.monotonic()
                state.audio_out_s += len(out) / SAMPLE_RATE
                self.reply(state.req.reply_to, AudioOutput(rid=rid, pcm=pcm16_bytes(out), marks=marks))

    def finish_completed(self) -> None:
        for rid in [rid for rid, s in self.states.items() if s.complete]:
            state = self.forget(rid)
            self.reply(state.req.reply_to, AudioOutput(rid=rid, pcm=b"", finished=True))

    # ---- messages ----------------------------------------------------------------------------

    def handle_start(self, req: DecodeStartReq) -> None:
        if self.aborted.pop(req.rid, None) is not None:
            log.debug("%s: start after its abort, ignored", req.rid)
            return
        if req.rid in self.states:
            raise ValueError(f"duplicate DecodeStartReq for {req.rid}")
        self.check_conditioning(req)
        state = DecodeState(req=req)
        state.pieces.append(self.new_piece(req))   # builds the tensors now: bad input fails at once
        if self.engine.prompt_cache is not None:   # the voice's key, hashed once for every sentence
            state.voice = state.pieces[0].t2w.conditioning_key
        self.states[req.rid] = state
        if req.stream and self.engine.prompt_cache is not None:
            self.to_warm.append((req.rid, state.pieces[0].t2w))

    def handle_tokens(self, batch: SpeechTokensBatchOutput) -> None:
        """One LLM step's tokens for this decoder: each row goes to its request on its own."""
        for rid, tokens, piece, piece_done, finished in batch.rows():
            try:
                self.feed(rid, tokens, piece, piece_done, finished)
            except Exception as e:  # a bad row fails its own request, not the rest of the batch
                self.dispatch.fail(rid, e)

    def feed(self, rid: str, tokens: list, piece: int, piece_done: bool, finished: bool) -> None:
        state = self.states.get(rid)
        if state is None:
            log.debug("%s: tokens for an unknown (aborted or failed) request dropped", rid)
            return
        if state.input_done or piece != state.piece:
            raise ValueError(f"tokens for sentence {piece}, expected {state.piece}"
                             + (" (request already finished)" if state.input_done else ""))
        open_piece = state.pieces[-1]
        if tokens:
            open_piece.feed(tokens)
        if piece_done or finished:
            open_piece.end()
            state.piece += 1
            if finished:
                state.input_done = True
            else:
                state.pieces.append(self.new_piece(state.req, state.voice))
        if not state.audio_sent and "tokens_ready" not in state.req.marks and state.ready:
            state.req.marks["tokens_ready"] = time.time()   # the first chunk can run

    def handle_abort(self, msg: AbortReq) -> None:
        if self.forget(msg.rid) is not None:
            self.aborted_count += 1
            log.debug("%s: aborted", msg.rid)
        else:
            self.aborted[msg.rid] = time.monotonic()

    # ---- helpers -----------------------------------------------------------------------------

    def check_conditioning(self, req: DecodeStartReq) -> None:
        tokens, feat, emb = (np.asarray(req.prompt_speech_tokens), np.asarray(req.prompt_feat),
                             np.asarray(req.embedding))
        bins, ratio = self.flow.output_size, self.flow.token_mel_ratio
        dim = self.flow.spk_embed_affine_layer.in_features
        if tokens.ndim != 1 or feat.ndim != 2 or feat.shape[1] != bins or feat.shape[0] != ratio * tokens.shape[0]:
            raise ValueError(f"bad prompt: {tokens.shape} speech tokens with features {feat.shape}; "
                             f"expected [N] and [{ratio}N, {bins}]")
        if emb.size != dim:
            raise ValueError(f"bad speaker embedding: {emb.shape}, expected [{dim}]")
        if req.stream and req.speed != 1.0:
            raise ValueError("speed other than 1.0 works only without streaming")

    def new_piece(self, req: DecodeStartReq, voice: Optional[bytes] = None):
        """The decoder of one sentence. With the prompt cache and no `voice` yet, the voice's key is
        hashed here, from the host tensors (no copy back from the GPU)."""
        import torch
        from light_tts.models.token2wav import StreamingDecoder, Token2Wav, conditioning_digest
        conditioning = (torch.from_numpy(np.asarray(req.prompt_speech_tokens)),
                        torch.from_numpy(np.asarray(req.prompt_feat, dtype=np.float32)),
                        torch.from_numpy(np.asarray(req.embedding, dtype=np.float32)))
        if voice is None and self.engine.prompt_cache is not None:
            voice = conditioning_digest(*conditioning)
        t2w = Token2Wav(self.flow, self.hift, *conditioning, self.schedule, seed=req.seed, voice=voice)
        return StreamingDecoder(t2w, req.stream, req.speed)

    def reply(self, reply_to: str, msg) -> None:
        self.send_to_http.send(reply_to, msg)

    def drop_request(self, rid: str) -> Optional[str]:
        """Dispatcher hook for a failed request: drop its state; returns its reply address if held."""
        state = self.forget(rid)
        return state.req.reply_to if state is not None else None

    def forget(self, rid: str) -> Optional[DecodeState]:
        """Drop a request's state and free what the engine keeps for its sentences; returns it."""
        state = self.states.pop(rid, None)
        if state is not None:
            self.engine.release([piece.t2w for piece in state.pieces])
        return state

    def forget_old_aborts(self) -> None:
        now = time.monotonic()
        for rid in [r for r, t in self.aborted.items() if now - t > ABORT_MEMORY_SECONDS]:
            del self.aborted[rid]

    def publish_stats(self) -> None:
        stats = {"active": len(self.states), "chunks": self.chunks, "audio_seconds": round(self.audio_seconds, 3),
                 "aborted": self.aborted_count, "errors": self.dispatch.errors,
                 "batch_sizes": dict(sorted(self.batch_sizes.items())),
                 "graph_captures_while_serving": self.engine.late_captures, **allocator_stats()}
        cache = self.engine.prompt_cache
        if cache is not None:
            stats.update(prompt_cache_hits=cache.hits, prompt_cache_misses=cache.misses,
                         prompt_cache_voices=len(cache.entries), stream_cache_streams=len(cache.streams),
                         stream_cache_frames_reused=cache.stream_frames_reused,
                         stream_cache_fallbacks=cache.stream_fallbacks)
        write_stats(self.endpoints, self.stage, stats)


def load_decode_model(model_dir: str, device: str, data_type: str):
    """(flow, hift) of the directory's family on `device`, weight norm folded into HiFT's convolutions."""
    from light_tts.models.pretrained import load_model
    model = load_model(model_dir, device, stage_dtype(data_type, device), components=("flow", "hift"))
    if hasattr(model.hift, "fold_weight_norm"):
        model.hift.fold_weight_norm()
    return model.flow, model.hift


def decode_device(index: int) -> str:
    """Device of decode process `index`: GPU index % visible GPUs (light_tts.server.decode.placement)."""
    import torch
    from light_tts.server.decode.placement import decode_device as assign
    return assign(index, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def shares_llm_device(device: str) -> bool:
    """Whether this decode process runs where the LLM does (light_tts.server.stage.stage_device(0))."""
    from light_tts.server.stage import stage_device
    return device == stage_device(0)


def check_trt_available() -> None:
    """--load_trt needs the tensorrt package: say what to install, before loading anything."""
    from light_tts.server.decode.trt import require_tensorrt
    require_tensorrt()


def run_decode_process(args, endpoints: Endpoints, index: int) -> None:
    """Entry point of decode process `index` (a fresh 'spawn' process)."""
    bound_cpu_caches()   # first: the caches read their capacity once, at the first convolution
    stage = f"decode:{index}"
    hb = start_stage(endpoints, stage, args.log_level)
    from light_tts.server.mps import limit_sms
    if (why := limit_sms(args.decode_sm_percent)) is not None:   # before torch's CUDA context
        log.warning("%s", why)
    if args.load_trt:
        try:
            check_trt_available()
        except RuntimeError as e:
            log.error("%s", e)
            raise SystemExit(3)
    import torch
    from light_tts.server.decode.engine import build_engine
    from light_tts.server.decode.placement import physical_gpu
    from light_tts.server.gpu_memory import cap_memory_or_exit, log_reserved, out_of_memory_hint
    device = decode_device(index)
    if device == "cpu":
        torch.set_num_threads(cpu_threads())
        # subnormal floats (they occur in the flow/HiFT activations) run 10-50x slower on x86 CPUs;
        # flushing them to zero changes no audible (or PCM16) value
        torch.set_flush_denormal(True)
    else:
        torch.cuda.set_device(device)
    plan = cap_memory_or_exit(args, stage, device)   # --gpu_memory_limit_gb, before any allocation
    t0 = time.perf_counter()
    dtype = stage_dtype(args.data_type, device)
    try:   # build_engine's warm-up runs the largest batch: a cap too small for it shows up here
        flow, hift = load_decode_model(args.model_dir, device, args.data_type)
        engine = build_engine(flow, hift, device, cuda_graph=not args.disable_cudagraph, load_jit=args.load_jit,
                              load_trt=args.load_trt, model_dir=args.model_dir, data_type=dtype,
                              max_batch_size=args.decode_max_batch_size, fused=not args.disable_fused_estimator,
                              prompt_cache_gb=args.decode_prompt_cache_gb,
                              stream_cache=args.decode_stream_cache, first_hop=args.decode_first_hop)
    except torch.cuda.OutOfMemoryError:
        log.error("%s", out_of_memory_hint(args, stage, plan))
        raise SystemExit(2)
    server = DecodeServer(endpoints, index, flow, hift, engine=engine, max_batch_size=args.decode_max_batch_size,
                          first_hop=args.decode_first_hop,
                          yield_to_llm=args.first_chunk_priority and shares_llm_device(device))
    gpu = physical_gpu(index, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()) \
        if device != "cpu" else None
    log.info("ready on %s%s (%s) in %.1f s", device, f" (physical GPU {gpu})" if gpu else "", dtype,
             time.perf_counter() - t0)
    log_reserved(stage, device, plan)
    hb.ready()
    server.run_forever()
