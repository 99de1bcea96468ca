"""The HTTP surface (FastAPI). Thin: validate, route to the backend, stream the answer back.

Three client families work unchanged: LightTTS's (POST multipart, `stream`, `tts_model_name`,
/healthz, /query_tts_model, WS /inference_zero_shot_bistream), the official CosyVoice runtime's
(GET or POST with form fields, raw PCM back) and seed 001's benchmark (JSON with base64 audio).
This module imports neither torch nor model code.

Bad input raises RequestError (io_struct) with the status and message the client gets; a stage's
ErrorOutput carries the same two. Overload (manager.Overloaded, a RequestError) is answered by
overloaded_response: 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
import re
import time
from datetime import datetime, timezone
from typing import Optional

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile

from light_tts.audio_out import SAMPLE_RATE, wav_header
from light_tts.server.encode.voice_store import VoiceStore
from light_tts.server.http import client_json
from light_tts.server.http.manager import BackendClient, Overloaded
from light_tts.server.http.metrics import Metrics
from light_tts.server.http.ws import TTSSocket, lighttts_bistream
from light_tts.server.io_struct import AudioOutput, ErrorOutput, RequestError, VoiceOutput
from light_tts.server.ipc import Endpoints

log = logging.getLogger("lighttts")
VOICE_ID = re.compile(r"^[A-Za-z0-9_.\-\u4e00-\u9fff]{1,64}$")


HEALTH_PATHS = ("/healthz", "/health", "/liveness", "/readiness")


class Guard:
    """ASGI middleware in front of every route: the API key (all but health), and the upload cap,
    checked on Content-Length and again while the body is read (chunked uploads carry no length),
    so an oversize body is refused before it is buffered or spooled. Pure ASGI, so the limit error
    is raised inside the route's own read and answered there as a 413."""

    def __init__(self, app, api_key: Optional[str], limit: int):
        self.app, self.api_key, self.limit = app, api_key, limit

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"").decode(errors="replace")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            if self.api_key and not self._authorized(dict(scope.get("headers") or [])):
                await receive()  # websocket.connect
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] not in HEALTH_PATHS:
            if not self._authorized(headers):
                return await error(401, "missing or wrong API key (Authorization: Bearer ...)")(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await error(413, f"request body is {int(length)} bytes; the limit is {self.limit} "
                                    f"(--max_upload_bytes)")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestError(413, f"request body is over the limit of {self.limit} bytes "
                                            f"(--max_upload_bytes)")
            return message
        await self.app(scope, limited_receive, send)


GONE = object()        # Api._next_unless_gone: the client disconnected
CLIENT_CLOSED = 499    # the status nginx logs for a client that closed the request (metrics only)


def error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers or None)


def overloaded_response(e: Overloaded) -> JSONResponse:
    """503 with Retry-After: this worker has --max_queue_size requests in flight."""
    return error(e.status, str(e), **{"Retry-After": "1"})


# ---- request parsing ------------------------------------------------------------------------------

async def read_params(request: Request) -> dict:
    """Form (multipart or urlencoded, GET or POST), JSON, or query string -> {name: str | bytes}."""
    params: dict = dict(request.query_params)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        body = client_json.loads(await request.body(), "request body")
        if not isinstance(body, dict):
            raise RequestError(400, "JSON body must be an object")
        params.update(body)
        for key in ("prompt_wav", "prompt_audio"):
            if isinstance(params.get(key), str):
                try:
                    params[key] = base64.b64decode(params[key], validate=True)
                except (binascii.Error, ValueError):
                    raise RequestError(400, f"{key}: not valid base64")
    elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form()
        for key, value in form.multi_items():
            params[key] = await value.read() if isinstance(value, UploadFile) else value
    elif ctype and request.method == "POST" and await request.body():
        raise RequestError(415, f"unsupported content type {ctype!r}: send multipart/form-data or application/json")
    return params


def _text(params: dict, *names: str) -> str:
    for n in names:
        v = params.get(n)
        if v is not None:
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError(400, f"{n}: not UTF-8 text")
            if not isinstance(v, str):
                v = str(v)
            return v
    return ""


def _bool(params: dict, *names: str, default: bool = False) -> bool:
    raw = _text(params, *names).strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise RequestError(400, f"{names[0]}: expected true or false, got {raw!r}")


def _number(params: dict, name: str, kind, lo, hi, default=None):
    raw = _text(params, name).strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise RequestError(400, f"{name}: expected a {'number' if kind is float else 'whole number'}, got {raw!r}")
    if not lo <= value <= hi or value != value:
        raise RequestError(400, f"{name}: must be between {lo} and {hi}, got {raw}")
    return value


def _audio(params: dict) -> Optional[bytes]:
    for key in ("prompt_wav", "prompt_audio"):
        v = params.get(key)
        if isinstance(v, bytes):
            return v
        if isinstance(v, str) and v:
            raise RequestError(400, f"{key}: upload the audio as a file (multipart) or base64 in JSON")
    return None


def model_family(model_dir: str) -> Optional[str]:
    """"cosyvoice2" / "cosyvoice3": the yaml the directory holds, in the official AutoModel's order (as
    light_tts.models.pretrained.model_family, which imports torch: the HTTP workers do not); None if neither."""
    for family in ("cosyvoice2", "cosyvoice3"):
        if os.path.isfile(os.path.join(model_dir, f"{family}.yaml")):
            return family
    return None


class Api:
    def __init__(self, args, endpoints: Endpoints, model_name: str):
        self.args = args
        self.client = BackendClient(endpoints, max_in_flight=args.max_queue_size)
        self.metrics = Metrics(endpoints)
        self.model_name = model_name
        self.model_family = model_family(getattr(args, "model_dir", "") or "")

    # -- synthesis request from parameters --
    def tts_fields(self, params: dict, mode: str, default_format: str) -> dict:
        tts_text = _text(params, "tts_text", "input")
        prompt_text = _text(params, "prompt_text")
        if not tts_text and _text(params, "text"):      # seed 002: `text` is what to speak
            tts_text = _text(params, "text")
        elif tts_text and not prompt_text:              # otherwise `text` may name the prompt transcript
            prompt_text = _text(params, "text")
        if not tts_text.strip():
            raise RequestError(400, "tts_text is required and must not be empty")
        limit = self.args.max_req_total_len
        if len(tts_text) > limit:  # every character costs at least one token
            raise RequestError(400, f"tts_text is {len(tts_text)} characters; the limit is {limit} "
                                    f"(--max_req_total_len)")
        voice_id = _text(params, "voice_id", "spk_id", "voice").strip() or None
        audio = _audio(params)
        if mode == "sft" and not voice_id:
            raise RequestError(400, "spk_id is required: the id of a registered voice (POST /voices)")
        if voice_id is None and audio is None:
            raise RequestError(400, "prompt_wav is required (a WAV, FLAC, OGG or MP3 upload), "
                                    "or voice_id of a registered voice")
        if voice_id is None and len(audio) == 0:
            raise RequestError(400, "prompt_wav is empty (0 bytes)")
        if mode == "zero_shot" and voice_id is None and not prompt_text.strip():
            # no transcript (seed 002 sends only `text`): clone the voice the way cross-lingual
            # does, conditioning only the flow on the prompt
            mode = "cross_lingual"
        instruct = _text(params, "instruct_text")
        if mode == "instruct2" and not instruct.strip():
            raise RequestError(400, "instruct_text is required for instruct2")
        stream = _bool(params, "stream", "streaming")
        speed = _number(params, "speed", float, 0.5, 2.0, 1.0)
        if stream and speed != 1.0:
            raise RequestError(400, "speed other than 1.0 works only without streaming")
        # streaming answers raw PCM (LightTTS clients expect exactly that) unless format=wav
        fmt = (_text(params, "format", "response_format").strip().lower() or ("pcm" if stream else default_format))
        if fmt not in ("wav", "pcm"):
            raise RequestError(400, f"format must be wav or pcm, got {fmt!r}")
        return dict(mode="zero_shot" if mode == "sft" else mode, tts_text=tts_text, prompt_text=prompt_text,
                    prompt_audio=audio if voice_id is None else None, voice_id=voice_id, instruct_text=instruct,
                    stream=stream, speed=speed, seed=_number(params, "seed", int, 0, 2**63 - 1),
                    max_speech_tokens=_number(params, "max_speech_tokens", int, 1, limit),
                    fixed_speech_tokens=_number(params, "fixed_speech_tokens", int, 1, limit), _format=fmt)

    async def synthesize(self, request: Request, fields: dict, endpoint: str) -> Response:
        fmt = fields.pop("_format")
        t0 = time.time()
        outputs = self.client.synthesize(self.args.request_timeout, **fields)
        try:
            # the generator's first step admits it or raises Overloaded; a non-streaming request's
            # first output is its whole audio, so a client that leaves meanwhile must abort it here
            first = await self._next_unless_gone(request, outputs)
        except Overloaded as e:
            self.metrics.done(endpoint, e.status)
            return overloaded_response(e)
        if first is GONE:
            await outputs.aclose()   # drops the request in every stage
            self.metrics.done(endpoint, CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(first, ErrorOutput):
            self.metrics.done(endpoint, first.status)
            return error(first.status, first.message)
        received = time.time()
        self.metrics.first_chunk(received - t0, first.marks, received)
        if fields["stream"]:
            return StreamingResponse(self._stream(first, outputs, fmt, endpoint, t0),
                                     media_type="audio/wav" if fmt == "wav" else "audio/pcm",
                                     headers={"X-Sample-Rate": str(SAMPLE_RATE)})
        pcm = bytearray(first.pcm)
        async for out in self._until_disconnect(request, outputs):
            if isinstance(out, ErrorOutput):
                self.metrics.done(endpoint, out.status)
                return error(out.status, out.message)
            pcm += out.pcm
        self.metrics.done(endpoint, 200, audio_seconds=len(pcm) / 2 / SAMPLE_RATE, wall=time.time() - t0)
        body = bytes(pcm) if fmt == "pcm" else wav_header(len(pcm)) + bytes(pcm)
        return Response(body, media_type="audio/wav" if fmt == "wav" else "audio/pcm",
                        headers={"X-Sample-Rate": str(SAMPLE_RATE)})

    async def _stream(self, first: AudioOutput, outputs, fmt: str, endpoint: str, t0: float):
        samples = 0
        status = 200
        try:
            if fmt == "wav":
                yield wav_header(None)
            yield first.pcm
            samples += len(first.pcm) // 2
            async for out in outputs:
                if isinstance(out, ErrorOutput):  # headers are gone: end the stream early, log why
                    log.warning("stream %s ended by error %d: %s", endpoint, out.status, out.message)
                    status = out.status
                    return
                if out.pcm:
                    samples += len(out.pcm) // 2
                    yield out.pcm
        finally:
            await outputs.aclose()
            self.metrics.done(endpoint, status, audio_seconds=samples / SAMPLE_RATE, wall=time.time() - t0)

    @staticmethod
    async def _next_unless_gone(request: Request, outputs):
        """The generator's next item, or GONE if the client disconnects first (the pending step is
        cancelled; the caller closes the generator, which aborts the request)."""
        nxt = asyncio.ensure_future(outputs.__anext__())
        try:
            while True:
                gone = asyncio.ensure_future(request.is_disconnected())
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if nxt in done:
                    gone.cancel()
                    return nxt.result()
                if gone.result():
                    return GONE
                await asyncio.sleep(0.05)
        finally:
            if not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)  # let it unwind before aclose()

    @classmethod
    async def _until_disconnect(cls, request: Request, outputs):
        """Iterate outputs; if the client leaves first, closing the generator aborts the request."""
        try:
            while True:
                try:
                    out = await cls._next_unless_gone(request, outputs)
                except StopAsyncIteration:
                    return
                if out is GONE:
                    return
                yield out
        finally:
            await outputs.aclose()


def create_app(args, endpoints: Endpoints, model_name: str = "CosyVoice2-0.5B") -> FastAPI:
    api = Api(args, endpoints, model_name)
    app = FastAPI(title="LightTTS", version="0.1.0",
                  description="CosyVoice2 and CosyVoice3 text-to-speech: zero-shot voice cloning over HTTP")
    app.state.api = api

    @app.on_event("startup")
    async def _start():
        await api.client.start()

    @app.on_event("shutdown")
    async def _stop():
        await api.client.stop()

    app.add_middleware(Guard, api_key=args.api_key, limit=args.max_upload_bytes)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        api.metrics.done(request.url.path, e.status)
        return error(e.status, str(e))

    async def synth(request: Request, mode: str, endpoint: str):
        try:
            params = await read_params(request)
            # GET is the official runtime's surface: it reads raw PCM; POST answers WAV unless asked
            fields = api.tts_fields(params, mode, "pcm" if request.method == "GET" else "wav")
        except RequestError as e:
            api.metrics.done(endpoint, e.status)
            return error(e.status, str(e))
        return await api.synthesize(request, fields, endpoint)

    def synth_route(mode: str, path: str):
        # a closure, not default arguments: FastAPI would publish those as query parameters a client could set
        async def handler(request: Request):
            return await synth(request, mode, path)
        return handler

    for mode in ("zero_shot", "cross_lingual", "instruct2", "sft"):
        path = f"/inference_{mode}"
        app.add_api_route(path, synth_route(mode, path), methods=["GET", "POST"], name=f"inference_{mode}")

    @app.api_route("/inference_instruct", methods=["GET", "POST"])
    async def inference_instruct():
        # the official runtime's route for CosyVoice-300M-Instruct (a speaker id + instruction): no
        # such model here; CosyVoice2/3 take the instruction with a prompt voice
        api.metrics.done("/inference_instruct", 400)
        return error(400, "/inference_instruct is CosyVoice-300M-Instruct's route; with CosyVoice2 and CosyVoice3 "
                          "use /inference_instruct2 (tts_text, instruct_text, and prompt_wav or voice_id)")

    @app.post("/v1/audio/speech")
    async def openai_speech(request: Request):
        try:
            params = await read_params(request)
            if not _text(params, "voice"):
                raise RequestError(400, "voice is required: the voice_id of a registered voice (POST /voices)")
            fields = api.tts_fields(params, "zero_shot", "wav")
        except RequestError as e:
            api.metrics.done("/v1/audio/speech", e.status)
            return error(e.status, str(e))
        return await api.synthesize(request, fields, "/v1/audio/speech")

    @app.post("/voices")
    async def register_voice(request: Request):
        params = await read_params(request)
        voice_id = _text(params, "voice_id", "spk_id").strip()
        if not VOICE_ID.match(voice_id):
            raise RequestError(400, "voice_id is required: 1-64 letters, digits, '_', '-', '.'")
        prompt_text = _text(params, "prompt_text", "text")
        audio = _audio(params)
        if not audio:
            raise RequestError(400, "prompt_wav is required (a WAV, FLAC, OGG or MP3 upload)")
        if not prompt_text.strip():
            raise RequestError(400, "prompt_text is required: the transcript of prompt_wav")
        try:
            out = await api.client.register_voice(voice_id, prompt_text, audio, args.request_timeout)
        except Overloaded as e:
            return overloaded_response(e)
        except asyncio.TimeoutError:
            return error(504, f"voice registration timed out after {args.request_timeout:g} s")
        if isinstance(out, ErrorOutput):
            return error(out.status, out.message)
        return {"voice_id": voice_id, "speech_tokens": int(len(out.voice.speech_tokens))}

    voice_store = VoiceStore(endpoints.root)   # what the encode processes keep (encode/voice_store.py)

    @app.get("/voices")
    async def list_voices():
        """The registered voices of this instance, oldest first, each with when it was registered."""
        return {"voices": [{"voice_id": voice_id, "registered_at": datetime.fromtimestamp(t, timezone.utc).isoformat()}
                           for voice_id, t in voice_store.list()]}

    @app.delete("/voices/{voice_id}")
    async def delete_voice(voice_id: str):
        try:
            out = await api.client.delete_voice(voice_id, args.request_timeout)
        except Overloaded as e:
            return overloaded_response(e)
        except asyncio.TimeoutError:
            return error(504, f"voice deletion timed out after {args.request_timeout:g} s")
        if isinstance(out, VoiceOutput) and out.existed:
            return {"voice_id": voice_id, "deleted": True}
        return error(404, f"unknown voice_id {voice_id!r}")

    def health_response():
        stages = api.client.health()
        down = {s: why for s, why in stages.items() if why != "ok"}
        if down:
            return JSONResponse({"status": "unhealthy", "stages": stages,
                                 "detail": "; ".join(f"{s}: {w}" for s, w in down.items())}, status_code=503)
        return {"status": "healthy"}

    app.add_api_route("/healthz", health_response, methods=["GET"])
    app.add_api_route("/health", health_response, methods=["GET"])
    app.add_api_route("/readiness", health_response, methods=["GET"])

    @app.get("/liveness")
    async def liveness():
        return {"status": "alive"}

    @app.api_route("/query_tts_model", methods=["GET", "POST"])
    async def query_tts_model():
        return {"tts_models": [api.model_name], "model_family": api.model_family}

    @app.get("/metrics")
    async def metrics():
        body, ctype = api.metrics.render(in_flight=len(api.client.states), rejected=api.client.rejected)
        return Response(body, media_type=ctype)

    @app.websocket("/inference_zero_shot_bistream")
    async def bistream(ws: WebSocket):
        await lighttts_bistream(api, ws)

    @app.websocket("/ws/tts")
    async def ws_tts(ws: WebSocket):
        await TTSSocket(api, ws).run()

    return app
