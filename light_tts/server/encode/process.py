"""The encode stage: validates and encodes what a request brings, then hands it to the LLM.

    HTTP ──TTSReq, TextPieceReq, Voice*Req, AbortReq──> [recv_from_http]  encode
    encode [send_to_llm]  ──LLMReq, TextTokensReq, AbortReq──> LLM
    encode [send_to_http] ──VoiceOutput, ErrorOutput──> the HTTP worker named by reply_to

TTSReq -> text normalised and split into sentences, each tokenised; the voice (prompt upload
encoded through the frontend and its cache, or a registered voice_id, looked up in the voice store
on every use: voice_store.py) -> LLMReq whose DecodeStartReq
carries the flow conditioning. Bad input raises RequestError (undecodable prompt audio too), which
the Dispatcher (light_tts.server.stage) answers as an ErrorOutput with its 4xx status and reason.
One message is handled at a time, in arrival order.

Bistream (TTSReq.bistream): the voice is encoded as usual and the LLMReq goes out with no text;
the request's TextPieceReq messages then go through a TextStream (incremental normalisation that
never cuts a word or number) and out as TextTokensReq. The per-request text state is dropped at
finish, on AbortReq, and (oldest first) beyond MAX_STREAMS, so a vanished client leaks nothing.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict

import zmq

from light_tts.frontend.audio import AudioError
from light_tts.frontend.frontend import Frontend, PromptLimits
from light_tts.frontend.text_stream import TextStream
from light_tts.frontend.voice_cache import Voice
from light_tts.server.io_struct import (AbortReq, DecodeStartReq, LLMReq, RequestError, TextPieceReq, TextTokensReq,
                                        TTSReq, VoiceData, VoiceDeleteReq, VoiceOutput, VoiceRegisterReq, VoiceStoreReq,
                                        sock_recv, sock_send)
from light_tts.server.gpu_memory import encode_cuda_budget
from light_tts.server.ipc import Endpoints, ReplySockets, bind_pull, connect_push, write_stats
from light_tts.server.stage import STATS_SECONDS, Dispatcher, Ticker, stage_device, start_stage
from light_tts.server.encode.voice_store import Entry, VoiceStore

log = logging.getLogger("lighttts")
MAX_STREAMS = 4096          # bistream text states kept (far above any sane number of open sockets)
POLL_MS = 100               # longest block on the socket (stats are published between messages)


def to_voice_data(v: Voice) -> VoiceData:
    return VoiceData(prompt_text_ids=v.prompt_text_ids, speech_tokens=v.speech_tokens, embedding=v.embedding,
                     prompt_feat=v.prompt_feat)


class EncodeWorker:
    def __init__(self, args, endpoints: Endpoints, index: int):
        self.args, self.index, self.endpoints = args, index, endpoints
        self.stage = f"encode:{index}"
        use_cuda = stage_device(0).startswith("cuda")   # the speech tokenizer, with onnxruntime-gpu
        self.frontend = Frontend(args.model_dir, cache_capacity=args.cache_capacity,
                                 limits=PromptLimits(args.min_prompt_seconds, args.max_prompt_seconds),
                                 use_cuda=use_cuda, cuda_mem_limit=encode_cuda_budget(args) if use_cuda else 0)
        self.ctx = zmq.Context()
        self.recv_from_http = bind_pull(self.ctx, endpoints.encode(index))
        self.send_to_llm = connect_push(self.ctx, endpoints.llm)
        self.send_to_http = ReplySockets(self.ctx)
        self.dispatch = Dispatcher(self.stage, {
            TTSReq: self.handle_tts, TextPieceReq: self.handle_text, AbortReq: self.handle_abort,
            VoiceRegisterReq: self.handle_register, VoiceStoreReq: self.handle_store,
            VoiceDeleteReq: self.handle_delete}, reply=self.reply, drop=self.drop_request)
        self.stats_ticker = Ticker(STATS_SECONDS)
        self.requests = 0
        self.streams: OrderedDict[str, TextStream] = OrderedDict()
        # registered voices: the store (--voice_dir, shared by the deployment's instances, or the instance
        # directory) is the record; `known` keeps what this process read, checked against the file on each use
        self.voices = VoiceStore.for_instance(args.voice_dir, endpoints.root)
        self.known: OrderedDict[str, Entry] = OrderedDict()
        self.max_known = max(1, args.max_voices)
        for entry in self.voices.entries(arrays=True, limit=self.max_known):
            self.known[entry.voice_id] = entry
        if self.known:
            log.info("%s: %d registered voice(s) loaded from %s", self.stage, len(self.known), self.voices.dir)

    # ---- the loop -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Pay at start what the first request would pay: ONNX Runtime's first runs (speech
        tokenizer, speaker model), the text normaliser's grammars. One prompt and two sentences,
        nothing cached; a failure only warns (the first request then pays it)."""
        import numpy as np
        from light_tts.audio_out import SAMPLE_RATE, pcm16_bytes, wav_header
        t0 = time.perf_counter()
        t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
        pcm = pcm16_bytes(0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)))
        try:
            self.frontend.encode_voice(wav_header(len(pcm)) + pcm, "Warming up, one two three.", use_cache=False)
            for text in ("It is 10:30 on March 3rd, 2026; the total is $12.50.", "今天是2026年12月3日，气温12度。"):
                for piece in self.frontend.normalize(text, split=True):
                    self.frontend.tokenize(piece)
        except Exception as e:
            log.warning("warm-up failed (%s); the first request pays for it", e)
            return
        log.info("warm-up took %.2f s", time.perf_counter() - t0)

    def run_forever(self) -> None:
        while True:
            if self.recv_from_http.poll(POLL_MS):
                self.dispatch(sock_recv(self.recv_from_http))
            if self.stats_ticker.due():
                self.publish_stats()

    def reply(self, reply_to: str, msg) -> None:
        self.send_to_http.send(reply_to, msg)

    def drop_request(self, rid: str) -> None:
        """Dispatcher hook for a failed request: drop its text state; a bistream request's LLMReq has
        gone out, so the LLM (which would wait for its text) drops it too."""
        if self.streams.pop(rid, None) is not None:
            sock_send(self.send_to_llm, AbortReq(rid=rid))

    def publish_stats(self) -> None:
        write_stats(self.endpoints, self.stage, dict(requests=self.requests, errors=self.dispatch.errors,
                                                     streams=len(self.streams),
                                                     voices=self.voices.count()))

    # ---- handlers -----------------------------------------------------------------------------

    def encode_voice(self, audio: bytes, prompt_text: str, **kw) -> Voice:
        try:
            return self.frontend.encode_voice(audio, prompt_text, **kw)
        except AudioError as e:   # undecodable, too short or too long: the client's input
            raise RequestError(400, f"prompt audio: {e}") from e

    def voice_for(self, req: TTSReq) -> Voice:
        if req.voice_id:
            voice = self.registered_voice(req.voice_id)
            if voice is None:
                raise RequestError(404, f"unknown voice_id {req.voice_id!r}; register it with POST /voices")
            return voice
        if not req.prompt_audio:
            raise RequestError(400, "prompt audio is required (prompt_wav) unless voice_id names a registered voice")
        return self.encode_voice(req.prompt_audio, req.prompt_text if req.mode == "zero_shot" else "")

    def handle_tts(self, req: TTSReq) -> None:
        self.requests += 1
        started = time.time()
        voice = self.voice_for(req)
        if req.bistream:
            return self.start_bistream(req, voice, started)
        pieces = [self.frontend.tokenize(p) for p in self.frontend.normalize(req.tts_text, split=True)]
        pieces = [p for p in pieces if p]
        if not pieces:
            raise RequestError(400, "tts_text has nothing to speak after text normalisation")
        self.send_llm_req(req, voice, pieces, started)

    def send_llm_req(self, req: TTSReq, voice: Voice, pieces: list, started: float) -> None:
        prompt_text, prompt_speech = self.frontend.lm_prompt(req.mode, voice, instruct_text=req.instruct_text,
                                                             tts_text=req.tts_text)
        decode = DecodeStartReq(rid=req.rid, reply_to=req.reply_to, prompt_speech_tokens=voice.speech_tokens,
                                prompt_feat=voice.prompt_feat, embedding=voice.embedding, stream=req.stream,
                                speed=req.speed, seed=req.seed, created=req.created,
                                marks=dict(http=req.created, encode_start=started, encode_done=time.time()))
        sock_send(self.send_to_llm, LLMReq(
            rid=req.rid, reply_to=req.reply_to, text_pieces=pieces, prompt_text_ids=prompt_text,
            prompt_speech_tokens=prompt_speech, decode=decode, seed=req.seed, max_speech_tokens=req.max_speech_tokens,
            fixed_speech_tokens=req.fixed_speech_tokens, bistream=req.bistream, created=req.created))

    # ---- bistream -------------------------------------------------------------------------------

    def start_bistream(self, req: TTSReq, voice: Voice, started: float) -> None:
        self.send_llm_req(req, voice, [], started)
        fe = self.frontend
        self.streams[req.rid] = TextStream(lambda t: fe.normalize(t, split=False), fe.tokenize)
        while len(self.streams) > MAX_STREAMS:
            self.streams.popitem(last=False)

    def handle_text(self, req: TextPieceReq) -> None:
        stream = self.streams.get(req.rid)
        if stream is None:   # ended (error, abort, or its voice failed): nothing to do
            return
        tokens = stream.push(req.text) if req.text else []
        if req.finish:
            tokens += stream.flush()
            del self.streams[req.rid]
        if tokens or req.finish:
            sock_send(self.send_to_llm, TextTokensReq(rid=req.rid, tokens=tokens, finish=req.finish))

    def handle_abort(self, req: AbortReq) -> None:
        self.streams.pop(req.rid, None)

    def registered_voice(self, voice_id: str):
        """The voice registered as voice_id: the store's (looked up on every use, so a voice registered,
        replaced or deleted through another instance counts at once), else the model's spk2info.pt."""
        entry = self.voices.get(voice_id, self.known.get(voice_id))
        if entry is None:
            self.known.pop(voice_id, None)
            return self.frontend.registered_voice(voice_id)
        self.known[voice_id] = entry
        self.known.move_to_end(voice_id)
        while len(self.known) > self.max_known:
            self.known.popitem(last=False)
        return entry.voice

    def handle_register(self, req: VoiceRegisterReq) -> None:
        """Encode the prompt; the HTTP worker checks the limits and stores it (under the store's lock)."""
        voice = self.encode_voice(req.prompt_audio, req.prompt_text, use_cache=False)
        self.reply(req.reply_to, VoiceOutput(rid=req.rid, voice_id=req.voice_id, voice=to_voice_data(voice)))

    def handle_store(self, req: VoiceStoreReq) -> None:
        self.known.pop(req.voice_id, None)   # the store has it: read at its next use

    def handle_delete(self, req: VoiceDeleteReq) -> None:
        """The HTTP worker has removed the stored voice; forget it here, and a spk2info voice of that id."""
        self.known.pop(req.voice_id, None)
        existed = self.frontend.cache.unregister(req.voice_id)
        self.reply(req.reply_to, VoiceOutput(rid=req.rid, voice_id=req.voice_id, existed=existed))


def run_encode_process(args, endpoints: Endpoints, index: int) -> None:
    hb = start_stage(endpoints, f"encode:{index}", args.log_level)
    import torch
    torch.set_num_threads(1)
    worker = EncodeWorker(args, endpoints, index)
    worker.warm_up()
    hb.ready()
    log.info("ready (cache capacity %d)", args.cache_capacity)
    worker.run_forever()
