"""The HTTP surface (FastAPI). Thin: validate, route to the backend, stream the answer back.

Three client families work unchanged: LightTTS's (POST multipart, `stream`, `tts_model_name`,
/healthz, /query_tts_model, WS /inference_zero_shot_bistream), the official CosyVoice runtime's
(GET or POST with form fields, raw PCM back) and seed 001's benchmark (JSON with base64 audio).
This module imports neither torch nor model code.

Bad input raises RequestError (io_struct) with the status and message the client gets; a stage's
ErrorOutput carries the same two. Overload (manager.Overloaded, a RequestError) is answered by
overloaded_response: 503 with Retry-After.

Middleware, outermost first: AccessLog (one line per request, X-Request-Id), Cors (only with
--cors_origins), Guard (API key, upload cap).
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
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional
from urllib.parse import quote

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers, UploadFile
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from light_tts.audio_out import SAMPLE_RATE, wav_header
from light_tts.server.args import api_keys, cors_origin_list
from light_tts.server.encode.voice_store import VoiceStore, key_quota, owner_of
from light_tts.server.http import client_json
from light_tts.server.http.manager import BackendClient, Overloaded
from light_tts.server.http.metrics import Metrics, log_request
from light_tts.server.http.ws import TTSSocket, lighttts_bistream
from light_tts.server.io_struct import AudioOutput, ErrorOutput, RequestError, VoiceOutput
from light_tts.server.ipc import Endpoints
from light_tts.server.stage import setup_logging

log = logging.getLogger("lighttts")
VOICE_ID = re.compile(r"^[A-Za-z0-9_.\-\u4e00-\u9fff]{1,64}$")


HEALTH_PATHS = ("/healthz", "/health", "/liveness", "/readiness")
CLIENT = "lighttts.client"   # the scope key of the caller's API key tag (voice_store.owner_of); "" without keys


class Guard:
    """ASGI middleware in front of every route: the API key (all but health), and the upload cap,
    checked on Content-Length and again while the body is read (chunked uploads carry no length),
    so an oversize body is refused before it is buffered or spooled. Pure ASGI, so the limit error
    is raised inside the route's own read and answered there as a 413. --api_key may hold several
    clients' keys (comma separated): the one a request carries is named in scope[CLIENT] by its tag
    (the voice quota and voice ownership count by it)."""

    def __init__(self, app, api_key: Optional[str], limit: int):
        self.app, self.limit = app, limit
        self.keys = [(f"Bearer {k}".encode(), owner_of(k)) for k in api_keys(api_key)]
        self.api_key = bool(self.keys)

    def _client(self, headers: dict) -> Optional[str]:
        """The tag of the key the request carries; None if it carries none of them."""
        given, found = headers.get(b"authorization", b""), None
        for expected, tag in self.keys:   # every key compared, in constant time each
            if hmac.compare_digest(given, expected):
                found = tag
        return found

    def _authorized(self, headers: dict) -> bool:
        return self._client(headers) is not None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            if self.api_key and not self._authorized(dict(scope.get("headers") or [])):
                await receive()  # websocket.connect
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        scope[CLIENT] = ""
        if self.api_key and scope["path"] not in HEALTH_PATHS:
            scope[CLIENT] = self._client(headers)
            if scope[CLIENT] is None:
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
DISCONNECT_CHECK_S = 0.05   # how often a request waiting for its next output checks its client
CLIENT_CLOSED = 499    # the status nginx logs for a client that closed the request (metrics and log only)
ACCESS = "lighttts.access"                    # the scope key of a request's AccessRecord
QUIET_PATHS = (*HEALTH_PATHS, "/metrics")     # probes and scrapes: access lines at debug level


def loggable(path: str) -> str:
    """A request path (percent-decoded by the server) quoted again for a log line, so that no client
    can write spaces, newlines or a line of its own into it; at most 200 characters."""
    return quote(path, safe="/:@!$&'()*+,;=-._~")[:200]


@dataclass
class AccessRecord:
    """What the access line of one HTTP request says; the synthesis routes fill in the audio."""
    rid: str
    t0: float
    status: int = 500                    # the response's status (500: no response started)
    outcome: Optional[int] = None        # how an answer whose headers went out ended otherwise (error, 499)
    audio_seconds: float = 0.0
    first_chunk: Optional[float] = None  # seconds from arrival to the first audio


class AccessLog:
    """Outermost middleware: the access line of every HTTP request once its answer has been sent
    (metrics.log_request; a stream's once its last byte has), and its id in X-Request-Id. The id is
    drawn before the request is read and the synthesis routes use it as the backend rid, so it also
    names the request in the stages' logs."""

    def __init__(self, app, api: "Api"):
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self.app(scope, receive, self._refusals(scope, send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = scope[ACCESS] = AccessRecord(rid=self.api.client.new_rid(), t0=time.time())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", record.rid.encode())]
            await send(message)
        try:
            await self.app(scope, receive, send_with_id)
        except (ClientDisconnect, asyncio.CancelledError):
            record.outcome = CLIENT_CLOSED
            raise
        except Exception:
            record.outcome = 500
            raise
        finally:
            path = scope["path"]
            log_request(record.rid, scope["method"], loggable(path),
                        record.outcome or record.status, record.audio_seconds, record.first_chunk,
                        time.time() - record.t0, level=logging.DEBUG if path in QUIET_PATHS else logging.INFO)

    def _refusals(self, scope, send):
        """A WebSocket's send, logging an upgrade refused before accept (a wrong API key, an unknown
        path: the client gets 403); an accepted socket logs its utterances itself (ws.py)."""
        t0, accepted = time.time(), False

        async def watched(message):
            nonlocal accepted
            if message["type"] == "websocket.accept":
                accepted = True
            elif message["type"] == "websocket.close" and not accepted:
                log_request(self.api.client.new_rid(), "WS", loggable(scope["path"]), 403, total=time.time() - t0)
            await send(message)
        return watched


class Cors:
    """CORS for --cors_origins (Starlette's CORSMiddleware) and for no other origin: a request from
    any other origin, or with none, passes on as if CORS were off (no CORS headers; its preflight
    gets 405, or 401 with --api_key, as without the flag). Outside Guard, so a preflight (which
    carries no Authorization) is answered without the API key."""

    def __init__(self, app, origins: list[str]):
        self.app = app
        self.allow_all = "*" in origins
        self.origins = set(origins)
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                                   allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                                   expose_headers=["X-Request-Id", "X-Sample-Rate", "Retry-After"], max_age=600)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            origin = Headers(scope=scope).get("origin")
            if origin is not None and (self.allow_all or origin in self.origins):
                return await self.cors(scope, receive, send)
        await self.app(scope, receive, send)


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
        record: Optional[AccessRecord] = request.scope.get(ACCESS)
        outputs = self.client.synthesize(self.args.request_timeout, rid=record.rid if record else None, **fields)
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
        record = record or AccessRecord(rid="", t0=t0)
        if first.pcm:
            record.first_chunk = received - record.t0
        # The official runtime streams every route, one chunk per model output (a sentence without
        # stream=true): its client (GET, raw PCM) gets each sentence's audio as soon as it exists.
        if fields["stream"] or (request.method == "GET" and fmt == "pcm"):
            return StreamingResponse(self._stream(first, outputs, fmt, endpoint, t0, record),
                                     media_type="audio/wav" if fmt == "wav" else "audio/pcm",
                                     headers={"X-Sample-Rate": str(SAMPLE_RATE)})
        pcm = bytearray(first.pcm)
        async for out in self._until_disconnect(request, outputs):
            if isinstance(out, ErrorOutput):
                self.metrics.done(endpoint, out.status)
                return error(out.status, out.message)
            if out.pcm and record.first_chunk is None:
                record.first_chunk = time.time() - record.t0
            pcm += out.pcm
        record.audio_seconds = len(pcm) / 2 / SAMPLE_RATE
        self.metrics.done(endpoint, 200, audio_seconds=record.audio_seconds, wall=time.time() - t0)
        body = bytes(pcm) if fmt == "pcm" else wav_header(len(pcm)) + bytes(pcm)
        return Response(body, media_type="audio/wav" if fmt == "wav" else "audio/pcm",
                        headers={"X-Sample-Rate": str(SAMPLE_RATE)})

    async def _stream(self, first: AudioOutput, outputs, fmt: str, endpoint: str, t0: float, record: AccessRecord):
        status = CLIENT_CLOSED   # until the last output has gone out
        try:
            if fmt == "wav":
                yield wav_header(None)
            record.audio_seconds = len(first.pcm) / 2 / SAMPLE_RATE
            yield first.pcm
            async for out in outputs:
                if isinstance(out, ErrorOutput):  # headers are gone: end the stream early, log why
                    log.warning("stream %s (%s) ended by error %d: %s", endpoint, out.rid, out.status, out.message)
                    status = out.status
                    return
                if out.pcm:
                    if record.first_chunk is None:
                        record.first_chunk = time.time() - record.t0
                    record.audio_seconds += len(out.pcm) / 2 / SAMPLE_RATE
                    yield out.pcm
            status = 200
        finally:
            await outputs.aclose()
            if status != 200:
                record.outcome = status
            self.metrics.done(endpoint, status, audio_seconds=record.audio_seconds, wall=time.time() - t0)

    @staticmethod
    async def _next_unless_gone(request: Request, outputs):
        """The generator's next item, or GONE if the client disconnects first (the pending step is
        cancelled; the caller closes the generator, which aborts the request). The item is returned
        the moment it exists; the client is looked at every DISCONNECT_CHECK_S while none does (a
        sleep between checks instead held each output back by up to that long: 31-39 ms of a first
        chunk's latency on average on the GPU, docs/benchmarks.md)."""
        nxt = asyncio.ensure_future(outputs.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=DISCONNECT_CHECK_S)
                if nxt in done:
                    return nxt.result()
                gone = asyncio.ensure_future(request.is_disconnected())
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if nxt in done:
                    gone.cancel()
                    return nxt.result()
                if gone.result():
                    return GONE
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
    if not logging.getLogger().handlers:
        # gunicorn configures only its own loggers: without this the access lines (info) went nowhere
        setup_logging(f"http:{os.getpid()}", getattr(args, "log_level", "info"))
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
    origins = cors_origin_list(getattr(args, "cors_origins", "") or "")
    if origins:
        app.add_middleware(Cors, origins=origins)
    app.add_middleware(AccessLog, api=api)     # added last: the outermost

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        api.metrics.done(request.url.path, e.status)
        return error(e.status, str(e))

    async def synth(request: Request, mode: str, endpoint: str):
        try:
            params = await read_params(request)
            # GET is the official runtime's surface: it reads raw PCM; POST answers --default_format
            # (WAV unless the operator chose pcm for LightTTS's non-streaming client) unless asked
            fields = api.tts_fields(params, mode, "pcm" if request.method == "GET" else args.default_format)
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

    # The voice store (encode/voice_store.py): --voice_dir, shared by every instance of the deployment, or
    # this instance's private directory. The encode stage encodes a prompt; this worker checks the limits
    # (--max_voices, the key's --voice_quota, another key's id) and writes or removes the file, both under
    # the store's lock, so instances registering at once cannot both take the last place.
    voice_store = VoiceStore.for_instance(getattr(args, "voice_dir", None), endpoints.root)
    max_voices, quota = args.max_voices, key_quota(args)

    def stored(voice_id: str, voice, owner: str) -> None:
        with voice_store.lock():
            voice_store.check_register(voice_id, owner, max_voices, quota)
            voice_store.save(voice_id, voice, owner)

    def unstored(voice_id: str, owner: str) -> bool:
        with voice_store.lock():
            voice_store.check_delete(voice_id, owner)
            return voice_store.delete(voice_id)

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
        owner = request.scope.get(CLIENT) or ""
        # refused before the costly encode; checked again under the lock when storing
        await asyncio.to_thread(voice_store.check_register, voice_id, owner, max_voices, quota)
        try:
            out = await api.client.register_voice(voice_id, prompt_text, audio, args.request_timeout)
        except Overloaded as e:
            return overloaded_response(e)
        except asyncio.TimeoutError:
            return error(504, f"voice registration timed out after {args.request_timeout:g} s")
        if isinstance(out, ErrorOutput):
            return error(out.status, out.message)
        await asyncio.to_thread(stored, voice_id, out.voice, owner)
        return {"voice_id": voice_id, "speech_tokens": int(len(out.voice.speech_tokens))}

    @app.get("/voices")
    async def list_voices(request: Request):
        """The registered voices (with --voice_dir: the deployment's), oldest first, each with when it
        was registered; with several API keys, also how many the caller's key holds and may hold."""
        entries = await asyncio.to_thread(voice_store.entries)
        body: dict = {"voices": [{"voice_id": e.voice_id,
                                  "registered_at": datetime.fromtimestamp(e.registered_at, timezone.utc).isoformat()}
                                 for e in entries]}
        owner = request.scope.get(CLIENT) or ""
        if owner and quota:
            body["quota"] = {"used": sum(e.owner == owner for e in entries), "limit": quota}
        return body

    @app.delete("/voices/{voice_id}")
    async def delete_voice(request: Request, voice_id: str):
        existed = await asyncio.to_thread(unstored, voice_id, request.scope.get(CLIENT) or "")
        try:   # the encode processes forget it (they would see the file gone anyway), and a spk2info voice
            out = await api.client.delete_voice(voice_id, args.request_timeout)
        except (Overloaded, asyncio.TimeoutError) as e:
            if existed:
                return {"voice_id": voice_id, "deleted": True}
            if isinstance(e, Overloaded):
                return overloaded_response(e)
            return error(504, f"voice deletion timed out after {args.request_timeout:g} s")
        if existed or (isinstance(out, VoiceOutput) and out.existed):
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
