"""WebSocket synthesis with text streamed in: `/ws/tts` (our protocol) and LightTTS's
`/inference_zero_shot_bistream`. Protocols: docs/websocket.md.

A socket runs one utterance at a time (an Utterance: a BistreamRequest plus its audio pump). The
socket's reader loop forwards text as it comes; the pump task sends audio as the decode stage
makes it. Every send goes through one lock, and an interrupt cancels the pump while holding it,
so no audio frame can follow the `interrupted` event.

A bad client message raises RequestError (io_struct), whose status and message the client gets
in the protocol's error event; Overloaded (too many requests in flight) is a RequestError with 503.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from typing import Optional

from fastapi import WebSocket, WebSocketDisconnect

from light_tts.audio_out import SAMPLE_RATE
from light_tts.server.http import client_json
from light_tts.server.http.manager import Overloaded
from light_tts.server.http.metrics import log_request
from light_tts.server.io_struct import ErrorOutput, RequestError

log = logging.getLogger("lighttts")


class Utterance:
    """One bistream request on a socket: text in, audio out, with an idle deadline (--request_timeout
    since the last text or audio) so an abandoned utterance never holds KV for long."""

    def __init__(self, api, request, index: int, request_id=None):
        self.api, self.request, self.index, self.request_id = api, request, index, request_id
        self.t_start = self.last_activity = time.time()
        self.t_first_text: Optional[float] = None
        self.chars = 0
        self.finished_text = False
        self.chunks = 0
        self.samples = 0
        self.first_chunk: Optional[float] = None   # seconds from start to the first audio
        self.status: Optional[int] = None          # why it ended, when not by its outputs (a text error)
        self.pump: Optional[asyncio.Task] = None

    async def text(self, text: str) -> None:
        self.chars += len(text)
        limit = self.api.args.max_req_total_len
        if self.chars > limit:
            raise RequestError(413, f"the utterance's text is over {limit} characters (--max_req_total_len)")
        if self.t_first_text is None:
            self.t_first_text = time.time()
        self.last_activity = time.time()
        await self.request.send_text(text)

    async def finish(self) -> None:
        self.finished_text = True
        self.last_activity = time.time()
        await self.request.send_text("", finish=True)

    def log(self, endpoint: str, status: int) -> None:
        """The utterance's access line (metrics.log_request)."""
        log_request(self.request.rid, "WS", endpoint, self.status or status, self.samples / SAMPLE_RATE,
                    self.first_chunk, time.time() - self.t_start)

    async def outputs(self):
        """AudioOutput / ErrorOutput until the request ends; a 504 ErrorOutput when idle too long."""
        timeout = self.api.args.request_timeout
        while True:
            left = self.last_activity + timeout - time.time()
            if left <= 0:
                yield ErrorOutput(rid=self.request.rid, status=504,
                                  message=f"no text or audio for {timeout:g} s (--request_timeout)")
                return
            try:
                out = await self.request.next_output(timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                continue
            self.last_activity = time.time()
            yield out
            if self.request.state.finished:
                return


class Sender:
    """Serialises sends on one socket (the reader loop and the pump both send)."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.lock = asyncio.Lock()

    async def json(self, obj: dict) -> None:
        async with self.lock:
            await self.ws.send_text(json.dumps(obj))

    async def audio(self, pcm: bytes, event: Optional[dict] = None) -> None:
        async with self.lock:
            await self.ws.send_bytes(pcm)
            if event is not None:
                await self.ws.send_text(json.dumps(event))


def _ms(t: Optional[float]) -> Optional[float]:
    return None if t is None else round((time.time() - t) * 1000, 1)


class TTSSocket:
    """WS /ws/tts."""

    def __init__(self, api, ws: WebSocket):
        self.api, self.ws = api, ws
        self.send = Sender(ws)
        self.utt: Optional[Utterance] = None
        self.count = 0

    async def run(self) -> None:
        await self.ws.accept()
        try:
            while True:
                raw = await self.ws.receive()
                if raw["type"] == "websocket.disconnect":
                    return
                try:
                    await self.handle(raw)
                except RequestError as e:
                    await self.error(e.status, str(e), final=False)
        except (WebSocketDisconnect, RuntimeError):
            return
        finally:
            await self.end_utterance(cancel=True)

    async def error(self, status: int, message: str, *, final: bool, utterance: Optional[int] = None) -> None:
        await self.send.json({"type": "error", "status": status, "message": message, "final": final,
                              "utterance": utterance if utterance is not None else
                              (self.utt.index if self.utt is not None else None)})

    async def handle(self, raw: dict) -> None:
        if raw.get("text") is None:
            raise RequestError(400, "binary frames are not accepted here: send JSON text frames "
                                    "(docs/websocket.md)")
        msg = client_json.loads(raw["text"], "message (every message is a JSON object with a \"type\")")
        if not isinstance(msg, dict):
            raise RequestError(400, "a message must be a JSON object with a \"type\"")
        kind = msg.get("type")
        if kind == "start":
            await self.start(msg)
        elif kind in ("text", "finish", "interrupt"):
            if self.utt is None:
                raise RequestError(409, f"{kind}: no utterance is active (send start first)")
            if kind == "interrupt":
                await self.interrupt()
            elif self.utt.finished_text:
                raise RequestError(409, f"{kind}: the utterance already got finish")
            elif kind == "finish":
                await self.utt.finish()
            else:
                text = msg.get("text")
                if not isinstance(text, str):
                    raise RequestError(400, "text: \"text\" must be a string")
                try:
                    await self.utt.text(text)
                except RequestError as e:  # the utterance cannot go on
                    index = self.utt.index
                    self.utt.status = e.status
                    await self.end_utterance(cancel=True)
                    await self.error(e.status, str(e), final=True, utterance=index)
        else:
            raise RequestError(400, f"unknown type {kind!r}: expected start, text, finish or interrupt")

    async def start(self, msg: dict) -> None:
        if self.utt is not None:
            raise RequestError(409, "start: an utterance is active; finish or interrupt it first")
        try:
            fields = start_fields(self.api, msg)
            request = await self.api.client.open_bistream(**fields)   # Overloaded: a RequestError, 503
        except RequestError as e:   # an utterance that never started has its access line too
            log_request(self.api.client.new_rid(), "WS", "/ws/tts", e.status)
            raise
        self.utt = utt = Utterance(self.api, request, self.count, msg.get("request_id"))
        self.count += 1
        await self.send.json({"type": "started", "utterance": utt.index, "request_id": utt.request_id})
        utt.pump = asyncio.create_task(self.pump(utt))

    async def pump(self, utt: Utterance) -> None:
        endpoint = "/ws/tts"
        status = 200
        try:
            async for out in utt.outputs():
                if isinstance(out, ErrorOutput):
                    status = out.status
                    self.release(utt)
                    await self.error(out.status, out.message, final=True, utterance=utt.index)
                    break
                if out.pcm:
                    if utt.chunks == 0:
                        utt.first_chunk = time.time() - utt.t_start
                        self.api.metrics.first_chunk(utt.first_chunk)
                    event = {"type": "chunk", "utterance": utt.index, "index": utt.chunks, "samples": len(out.pcm) // 2,
                             "ms_since_start": _ms(utt.t_start), "ms_since_first_text": _ms(utt.t_first_text)}
                    await self.send.audio(out.pcm, event)
                    utt.chunks += 1
                    utt.samples += len(out.pcm) // 2
                if out.finished:
                    self.release(utt)
                    await self.send.json({"type": "done", "utterance": utt.index, "chunks": utt.chunks,
                                          "audio_seconds": round(utt.samples / SAMPLE_RATE, 3)})
                    break
        except (WebSocketDisconnect, RuntimeError):
            status = 499
        except asyncio.CancelledError:   # interrupted, or the socket went away
            status = 499
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.api.metrics.done(endpoint, status, audio_seconds=utt.samples / SAMPLE_RATE,
                                  wall=time.time() - utt.t_start)
            utt.log(endpoint, status)
            self.release(utt)
            await utt.request.close()

    def release(self, utt: Utterance) -> None:
        """The socket is free for the next start once the client can see `utt` ended: before its
        final event is sent, not after the request's close, which the client may well outrun."""
        if self.utt is utt:
            self.utt = None

    async def interrupt(self) -> None:
        utt = self.utt
        async with self.send.lock:        # the pump is not mid-send while we hold this
            await self.end_utterance(cancel=True)
            await self.ws.send_text(json.dumps({"type": "interrupted", "utterance": utt.index}))

    async def end_utterance(self, cancel: bool) -> None:
        utt, self.utt = self.utt, None
        if utt is None:
            return
        if cancel and utt.pump is not None and not utt.pump.done():
            utt.pump.cancel()
            await asyncio.gather(utt.pump, return_exceptions=True)
        await utt.request.close()       # aborts in every stage unless it had ended


def start_fields(api, msg: dict) -> dict:
    """The request fields of a start message (voice_id, or prompt_wav base64 + prompt_text)."""
    from light_tts.server.http.app import VOICE_ID
    voice_id = msg.get("voice_id")
    prompt_text = msg.get("prompt_text", "")
    if not isinstance(prompt_text, str):
        raise RequestError(400, "start: prompt_text must be a string")
    audio = None
    if voice_id is not None:
        if not isinstance(voice_id, str) or not VOICE_ID.match(voice_id):
            raise RequestError(400, "start: voice_id must be 1-64 letters, digits, '_', '-', '.'")
    else:
        b64 = msg.get("prompt_wav")
        if not isinstance(b64, str) or not b64:
            raise RequestError(400, "start: give voice_id (a registered voice) or prompt_wav (base64 audio) "
                                    "+ prompt_text")
        if len(b64) > api.args.max_upload_bytes * 4 // 3 + 4:
            raise RequestError(413, f"start: prompt_wav is over the limit of {api.args.max_upload_bytes} bytes")
        try:
            audio = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "start: prompt_wav is not valid base64")
    fields = dict(voice_id=voice_id, prompt_audio=audio, prompt_text=prompt_text,
                  mode="zero_shot" if (voice_id or prompt_text.strip()) else "cross_lingual")
    for name, hi in (("seed", 2**63 - 1), ("max_speech_tokens", api.args.max_req_total_len)):
        v = msg.get(name)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or not (0 if name == "seed" else 1) <= v <= hi:
                raise RequestError(400, f"start: {name} must be a whole number in range")
        fields[name] = v
    return fields


async def lighttts_bistream(api, ws: WebSocket) -> None:
    """WS /inference_zero_shot_bistream (LightTTS's protocol): {prompt_text, tts_model_name}, the prompt
    audio as one binary frame, {"tts_text": ...} frames, {"finish": true}; PCM frames back as they
    are made; the server closes after the last one. Errors: {"error": ..., "status": ...}, then close."""
    await ws.accept()
    send = Sender(ws)
    request = None
    utt: Optional[Utterance] = None
    pump = None
    timeout = api.args.request_timeout
    t0 = time.time()
    status = 499   # the access line's: the client left, until the audio ends or an error says otherwise

    async def receive(frame: str, limit: Optional[float] = timeout):
        """The next frame, which must be `frame` ("text" or "bytes"): the wrong kind is a 400 that
        says which was expected. A client silent for `limit` seconds (None: no limit) gets 408."""
        try:
            msg = await asyncio.wait_for(ws.receive(), limit)
        except asyncio.TimeoutError:
            raise RequestError(408, f"nothing received for {limit:g} s (--request_timeout)") from None
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        data = msg.get(frame)
        if data is None:
            want = "a text frame (JSON)" if frame == "text" else "a binary frame (the prompt audio)"
            raise RequestError(400, f"expected {want}, got a {'binary' if frame == 'text' else 'text'} frame")
        return data

    async def error_and_close(event: dict, code: int) -> None:
        """Tell the client and close; the pump may have closed the socket already (its own error)."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await send.json(event)
            await ws.close(code=code)

    async def forward(utt: Utterance):
        nonlocal status
        try:
            async for out in utt.outputs():
                if isinstance(out, ErrorOutput):   # a stage failed, or no text or audio for too long (504)
                    status = out.status
                    await send.json({"error": out.message, "status": out.status})
                    await ws.close(code=1011)      # the client's pending receive ends the handler
                    return
                if out.pcm:
                    if utt.first_chunk is None:
                        utt.first_chunk = time.time() - utt.t_start
                    utt.samples += len(out.pcm) // 2
                    await send.audio(out.pcm)
                if out.finished:
                    status = 200
                    return
        finally:  # ended, failed or timed out: free it in every stage now, not when the client leaves
            await utt.request.close()
    try:
        start = client_json.loads(await receive("text"), "the first message")
        if not isinstance(start, dict):
            raise RequestError(400, "the first message must be a JSON object {prompt_text, tts_model_name}")
        audio = await receive("bytes")
        if len(audio) > api.args.max_upload_bytes:
            raise RequestError(413, f"prompt audio is over the limit of {api.args.max_upload_bytes} bytes")
        prompt_text = str(start.get("prompt_text", ""))
        request = await api.client.open_bistream(prompt_text=prompt_text, prompt_audio=audio, voice_id=None,
                                                 mode="zero_shot" if prompt_text.strip() else "cross_lingual")
        utt = Utterance(api, request, 0)
        pump = asyncio.create_task(forward(utt))
        while True:   # no receive limit here: a stalled text stream ends with the stages' 504
            msg = client_json.loads(await receive("text", None), "text message")
            if not isinstance(msg, dict) or not (msg.get("finish") or isinstance(msg.get("tts_text"), str)):
                raise RequestError(400, 'text messages must be {"tts_text": "<text>"} or {"finish": true}')
            if msg.get("finish"):
                await utt.finish()
                break
            await utt.text(msg["tts_text"])
        await pump
        await ws.close()
    except (RequestError, ValueError, KeyError, TypeError) as e:   # Overloaded too: 503, "try again later"
        status = getattr(e, "status", 400)
        await error_and_close({"error": str(e), "status": status}, 1013 if isinstance(e, Overloaded) else 1003)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        if pump is not None and not pump.done():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        if request is not None:
            await request.close()
        endpoint = "/inference_zero_shot_bistream"
        if utt is not None:
            utt.log(endpoint, status)
        else:   # refused before it started
            log_request(api.client.new_rid(), "WS", endpoint, status, total=time.time() - t0)
