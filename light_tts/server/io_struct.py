"""Every message that crosses a process boundary, the one error type that carries an HTTP status,
and the only code that touches the wire.

Data flow (DESIGN §2):

    HTTP worker --TTSReq--> encode --LLMReq (carries DecodeStartReq)--> LLM
    LLM --DecodeStartReq, then SpeechTokensBatchOutput per step--> decode (one PUSH socket: ordered)
    decode --AudioOutput...--> the HTTP worker named by `reply_to`
    any stage --ErrorOutput--> the HTTP worker named by `reply_to`
    HTTP worker --AbortReq--> LLM and every decode process (and the encode process of a bistream)
    decode --YieldGpuReq--> LLM (a decoder on the LLM's GPU runs first chunks: --first_chunk_priority)

The LLM sends each decode process at most one SpeechTokensBatchOutput per step: parallel lists
with one row per request of that decoder that made tokens in the step. A request's DecodeStartReq
goes out on the same socket before the batch of the step that admitted it.

Bistream (text streamed in, WebSocket): the TTSReq has bistream=True and no text; the HTTP worker
then sends TextPieceReq to the same encode process (one PUSH socket: in order after the TTSReq),
which normalises and tokenises incrementally and sends TextTokensReq to the LLM (again one socket,
so after the LLMReq).

Requests carry `rid` (unique for the life of the instance, across HTTP workers) and `reply_to`
(the ipc address of the asking HTTP worker's PULL socket), so any number of HTTP workers share one
backend and every reply reaches the worker that asked. Names end in Req (asks for work) or Output
(a result); `_check_names` enforces it at import. Payloads are pickled; arrays travel as numpy.

Errors: RequestError(status, message) is raised by a stage's handler or by the HTTP and WebSocket
front ends; a stage turns it into an ErrorOutput with that status (light_tts.server.stage.Dispatcher),
the front ends into the response the client sees.

First-chunk marks: DecodeStartReq.marks collects when the request passed each point on its way to
its first audio (FIRST_CHUNK_MARKS, time.time() on the one host all stages share): encode stamps the
HTTP arrival and its own start and end, the LLM its prefill, the decode process when the first
chunk's tokens were there and its flow + HiFT call; the first AudioOutput brings them back, and the
HTTP worker turns them into the per-stage histogram of /metrics (first-chunk breakdown).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import zmq


# The points of a request's way to its first audio, in order (see "First-chunk marks" above).
FIRST_CHUNK_MARKS = ("http", "encode_start", "encode_done", "prefill_start", "prefill_done", "tokens_ready",
                     "decode_start", "decode_done")


class RequestError(Exception):
    """A request cannot be served: `status` is the HTTP status its client gets, `message` says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(kw_only=True)
class BaseReq:
    rid: str
    reply_to: str


# ---- HTTP -> encode ---------------------------------------------------------------------------

@dataclass(kw_only=True)
class TTSReq(BaseReq):
    """One synthesis request as the HTTP layer validated it."""
    mode: str                                 # zero_shot | cross_lingual | instruct2 | sft
    tts_text: str
    prompt_text: str = ""
    prompt_audio: Optional[bytes] = None      # the upload, undecoded: the encode stage decodes it
    voice_id: Optional[str] = None            # a registered voice instead of prompt_audio
    instruct_text: str = ""
    stream: bool = False
    speed: float = 1.0
    seed: Optional[int] = None
    max_speech_tokens: Optional[int] = None   # cap per sentence
    fixed_speech_tokens: Optional[int] = None  # benchmark mode: exactly N per sentence, eos ignored
    bistream: bool = False                    # text follows as TextPieceReq messages
    created: float = 0.0                      # time.time() at the HTTP worker


@dataclass(kw_only=True)
class TextPieceReq(BaseReq):
    """The next piece of a bistream request's text, raw (split anywhere); `finish`: no more."""
    text: str = ""
    finish: bool = False


@dataclass(kw_only=True)
class VoiceRegisterReq(BaseReq):
    voice_id: str
    prompt_text: str
    prompt_audio: bytes


@dataclass(kw_only=True)
class VoiceStoreReq(BaseReq):
    """Copy an encoded voice to the other encode processes (no reply)."""
    voice_id: str
    voice: "VoiceData"


@dataclass(kw_only=True)
class VoiceDeleteReq(BaseReq):
    voice_id: str


# ---- encode -> LLM -> decode ------------------------------------------------------------------

@dataclass(kw_only=True)
class VoiceData:
    """An encoded prompt (light_tts.frontend.voice_cache.Voice, as plain arrays)."""
    prompt_text_ids: np.ndarray
    speech_tokens: np.ndarray
    embedding: np.ndarray
    prompt_feat: np.ndarray


@dataclass(kw_only=True)
class DecodeStartReq(BaseReq):
    """Conditioning of one request's decode; the LLM forwards it before the first tokens."""
    prompt_speech_tokens: np.ndarray          # int32 [N]   flow prompt tokens
    prompt_feat: np.ndarray                   # float32 [2N, 80]
    embedding: np.ndarray                     # float32 [192]
    stream: bool = False
    speed: float = 1.0
    seed: Optional[int] = None
    created: float = 0.0
    marks: dict = field(default_factory=dict)  # FIRST_CHUNK_MARKS reached so far


@dataclass(kw_only=True)
class LLMReq(BaseReq):
    text_pieces: list                         # list of list[int]: one generation per sentence
    prompt_text_ids: np.ndarray               # int32, empty for cross_lingual
    prompt_speech_tokens: np.ndarray          # int32, empty for cross_lingual / instruct2
    decode: DecodeStartReq
    seed: Optional[int] = None
    max_speech_tokens: Optional[int] = None
    fixed_speech_tokens: Optional[int] = None
    bistream: bool = False                    # text_pieces is empty; text comes as TextTokensReq
    created: float = 0.0


@dataclass(kw_only=True)
class TextTokensReq:
    """Token ids of a bistream request's text, as the encode stage releases them."""
    rid: str
    tokens: list
    finish: bool = False


@dataclass(kw_only=True)
class SpeechTokensBatchOutput:
    """One LLM step's new speech tokens for the requests of one decode process: row i is request
    rids[i], its new tokens of sentence pieces[i], whether that sentence ended (piece_done[i]) and
    whether the whole request ended (finished[i]). At most one row per request."""
    rids: list = field(default_factory=list)
    tokens: list = field(default_factory=list)      # list[int] per row
    pieces: list = field(default_factory=list)
    piece_done: list = field(default_factory=list)
    finished: list = field(default_factory=list)

    def append(self, out) -> None:
        """Add a row from one request's step output (the LLM engine's TokenOutput: rid, tokens, piece,
        piece_done, finished)."""
        self.rids.append(out.rid)
        self.tokens.append(out.tokens)
        self.pieces.append(out.piece)
        self.piece_done.append(out.piece_done)
        self.finished.append(out.finished)

    def rows(self):
        """(rid, tokens, piece, piece_done, finished) per row; ValueError if the lists differ in length."""
        columns = (self.rids, self.tokens, self.pieces, self.piece_done, self.finished)
        if len({len(c) for c in columns}) != 1:
            raise ValueError(f"ragged SpeechTokensBatchOutput: column lengths {[len(c) for c in columns]}")
        return zip(*columns)


# ---- any stage -> HTTP ------------------------------------------------------------------------

@dataclass(kw_only=True)
class AudioOutput:
    rid: str
    pcm: bytes                                # little-endian int16, 24 kHz mono
    finished: bool = False
    marks: Optional[dict] = None              # on a request's first audio: DecodeStartReq.marks


@dataclass(kw_only=True)
class VoiceOutput:
    rid: str
    voice_id: str
    voice: Optional[VoiceData] = None         # set by register
    existed: bool = False                     # set by delete


@dataclass(kw_only=True)
class ErrorOutput:
    rid: str
    status: int                               # the HTTP status the client should see
    message: str
    stage: str = ""


# ---- decode -> LLM -----------------------------------------------------------------------------

@dataclass(kw_only=True)
class YieldGpuReq:
    """Decode process `decoder`, on the LLM's GPU, starts (running=True) or has ended (False) a call
    that computes the first chunks of streaming requests `rids`. While one runs, the LLM leaves
    streams past their first chunk out of its steps so that the first chunks get the GPU
    (--first_chunk_priority; light_tts.server.llm.process). A hint: losing one costs only speed."""
    decoder: int
    rids: list = field(default_factory=list)
    running: bool = True


# ---- HTTP -> LLM, decode ----------------------------------------------------------------------

@dataclass(kw_only=True)
class AbortReq:
    rid: str


def _check_names() -> None:
    for name, obj in list(globals().items()):
        if isinstance(obj, type) and obj.__module__ == __name__ and hasattr(obj, "__dataclass_fields__"):
            if not (name.endswith("Req") or name.endswith("Output") or name in ("VoiceData",)):
                raise TypeError(f"io_struct: message type {name} must end in Req or Output")


_check_names()


def sock_send(sock: zmq.Socket, obj, flags: int = 0) -> None:
    sock.send(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), flags=flags, copy=False)


def sock_recv(sock: zmq.Socket, flags: int = 0):
    return pickle.loads(sock.recv(flags=flags, copy=False).buffer)


def drain(sock: zmq.Socket, limit: int = 1024) -> list:
    """Every message waiting on `sock` (non-blocking), at most `limit`."""
    out = []
    while len(out) < limit:
        try:
            out.append(sock_recv(sock, zmq.NOBLOCK))
        except zmq.Again:
            break
    return out


async def async_send(sock, obj) -> None:
    """sock_send for zmq.asyncio sockets (the HTTP workers)."""
    await sock.send(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), copy=False)


async def async_recv(sock):
    return pickle.loads((await sock.recv(copy=False)).buffer)
