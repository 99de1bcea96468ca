"""One HTTP worker's connection to the backend: sockets, request ids, reply routing, health.

Each worker (a uvicorn worker of api_server or a gunicorn worker) binds its own PULL socket and
stamps its address on every request; the backend answers there, and a receive loop hands each
output to the asyncio queue of the request it belongs to (`rid -> ReqState`). A watchdog reads
the stage status table and fails every request in flight within about a second when a stage dies,
so no client waits on a process that is gone.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import zmq
import zmq.asyncio

from light_tts.server.io_struct import (AbortReq, AudioOutput, ErrorOutput, RequestError, TextPieceReq, TTSReq,
                                        VoiceDeleteReq, VoiceOutput, VoiceRegisterReq, VoiceStoreReq, async_recv,
                                        async_send)
from light_tts.server.ipc import Endpoints, StatusTable, stage_health, worker_tag

log = logging.getLogger("lighttts")
WATCHDOG_SECONDS = 0.25


class Overloaded(RequestError):
    """This worker has --max_queue_size requests in flight: 503, and the client should retry shortly."""

    def __init__(self, reason: str):
        super().__init__(503, f"server busy: {reason}; retry shortly")


@dataclass
class ReqState:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.time)
    finished: bool = False


class BackendClient:
    def __init__(self, endpoints: Endpoints, max_in_flight: int = 256):
        self.endpoints = endpoints
        self.max_in_flight = max_in_flight
        # rid = <instance-unique worker tag>-<counter>: never reused while the instance lives. The
        # tag (and the reply address named by it) is drawn in start(), in the worker: under
        # gunicorn --preload this object is built in the master, and workers forked from it
        # would share one tag, bind one reply address, and the last to bind would get every
        # worker's replies (the others' requests would hang).
        self.tag = ""
        self._seq = itertools.count()
        self._encode_rr = itertools.count()
        self.states: dict[str, ReqState] = {}
        self.rejected = 0
        self._started = False

    # ---- lifecycle (inside the worker's event loop) --------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.tag = worker_tag()
        self.ctx = zmq.asyncio.Context()
        self.reply_addr = self.endpoints.http(self.tag)
        self.recv_from_backend = self.ctx.socket(zmq.PULL)
        self.recv_from_backend.setsockopt(zmq.LINGER, 0)
        self.recv_from_backend.bind(self.reply_addr)
        self.send_to_encode = [self._push(self.endpoints.encode(i)) for i in range(self.endpoints.encode_num)]
        self.send_to_llm = self._push(self.endpoints.llm)
        self.send_to_decode = [self._push(self.endpoints.decode(i)) for i in range(self.endpoints.decode_num)]
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._watchdog())]

    async def stop(self) -> None:
        for t in getattr(self, "_tasks", []):
            t.cancel()
        if self._started:
            self.ctx.destroy(linger=0)
            try:
                os.unlink(self.reply_addr[len("ipc://"):])
            except OSError:
                pass

    def _push(self, addr: str) -> zmq.asyncio.Socket:
        s = self.ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(addr)
        return s

    async def _send(self, sock, msg) -> None:
        await async_send(sock, msg)

    async def _receive_loop(self) -> None:
        while True:
            try:
                out = await async_recv(self.recv_from_backend)
            except asyncio.CancelledError:
                raise
            except Exception:  # one undecodable message must not stop this worker's replies
                log.exception("dropping a reply that could not be decoded")
                continue
            state = self.states.get(out.rid)
            if state is not None:  # replies of aborted requests are dropped here
                state.queue.put_nowait(out)

    async def _watchdog(self) -> None:
        table = None
        while True:
            await asyncio.sleep(WATCHDOG_SECONDS)
            if not self.states:
                continue
            try:
                table = table or StatusTable(self.endpoints.status_path)
            except (OSError, ValueError):
                table = None
            down = {s: why for s, why in stage_health(self.endpoints, table).items() if why not in ("ok",)}
            if down:
                stage, why = next(iter(down.items()))
                for rid, state in list(self.states.items()):
                    state.queue.put_nowait(ErrorOutput(rid=rid, status=503, stage=stage,
                                                       message=f"stage {stage} is down ({why})"))

    # ---- requests ------------------------------------------------------------------------------

    def health(self) -> dict[str, str]:
        return stage_health(self.endpoints)

    def new_rid(self) -> str:
        return f"{self.tag}-{next(self._seq)}"

    def _open(self, rid: Optional[str] = None) -> tuple[str, ReqState]:
        if len(self.states) >= self.max_in_flight:
            self.rejected += 1
            raise Overloaded(f"{len(self.states)} requests in flight (limit {self.max_in_flight})")
        rid = rid or self.new_rid()
        if rid in self.states:
            raise ValueError(f"request id {rid} is in flight already")
        state = self.states[rid] = ReqState()
        return rid, state

    async def synthesize(self, timeout: float, rid: Optional[str] = None, **fields) -> AsyncIterator:
        """Yield AudioOutput chunks; an ErrorOutput ends the stream (yielded, not raised). `rid`: an id
        from new_rid() (the access log's, given out before the request was read), else a fresh one."""
        rid, state = self._open(rid)
        req = TTSReq(rid=rid, reply_to=self.reply_addr, created=state.created, **fields)
        deadline = state.created + timeout
        try:
            await self._send(self.send_to_encode[next(self._encode_rr) % len(self.send_to_encode)], req)
            while True:
                left = deadline - time.time()
                if left <= 0:
                    yield ErrorOutput(rid=rid, status=504, message=f"request timed out after {timeout:g} s")
                    return
                try:
                    out = await asyncio.wait_for(state.queue.get(), timeout=left)
                except asyncio.TimeoutError:
                    continue
                yield out
                if isinstance(out, ErrorOutput) or (isinstance(out, AudioOutput) and out.finished):
                    state.finished = True
                    return
        finally:
            self.states.pop(rid, None)
            if not state.finished:  # client went away, timed out, or a stage failed: free it everywhere
                await self.abort(rid)

    async def abort(self, rid: str, encode=None) -> None:
        msg = AbortReq(rid=rid)
        if encode is not None:        # a bistream request: its encode process holds its text state
            await self._send(encode, msg)
        await self._send(self.send_to_llm, msg)
        for s in self.send_to_decode:
            await self._send(s, msg)

    async def open_bistream(self, **fields) -> "BistreamRequest":
        """Start a request whose text follows (BistreamRequest.send_text); raises Overloaded."""
        rid, state = self._open()
        encode = self.send_to_encode[next(self._encode_rr) % len(self.send_to_encode)]
        req = TTSReq(rid=rid, reply_to=self.reply_addr, created=state.created, tts_text="", stream=True,
                     bistream=True, **fields)
        try:
            await self._send(encode, req)
        except BaseException:
            self.states.pop(rid, None)
            raise
        return BistreamRequest(self, rid, state, encode)

    async def _single(self, sock, make, timeout: float):
        rid, state = self._open()
        try:
            await self._send(sock, make(rid))
            return await asyncio.wait_for(state.queue.get(), timeout=timeout)
        finally:
            self.states.pop(rid, None)

    async def register_voice(self, voice_id: str, prompt_text: str, audio: bytes, timeout: float):
        out = await self._single(self.send_to_encode[0], lambda rid: VoiceRegisterReq(
            rid=rid, reply_to=self.reply_addr, voice_id=voice_id, prompt_text=prompt_text, prompt_audio=audio), timeout)
        if isinstance(out, VoiceOutput):  # every encode process must know the voice
            for sock in self.send_to_encode[1:]:
                await self._send(sock, VoiceStoreReq(rid=out.rid, reply_to=self.reply_addr, voice_id=voice_id,
                                                     voice=out.voice))
        return out

    async def delete_voice(self, voice_id: str, timeout: float):
        for sock in self.send_to_encode[1:]:
            await self._send(sock, VoiceDeleteReq(rid=self.new_rid(), reply_to=self.reply_addr, voice_id=voice_id))
        return await self._single(self.send_to_encode[0], lambda rid: VoiceDeleteReq(
            rid=rid, reply_to=self.reply_addr, voice_id=voice_id), timeout)


class BistreamRequest:
    """One request whose text arrives in pieces. Its text goes to the encode process that got its
    TTSReq (the same PUSH socket keeps the order); its outputs come through the client's queue."""

    def __init__(self, client: BackendClient, rid: str, state: ReqState, encode):
        self.client, self.rid, self.state, self.encode = client, rid, state, encode
        self.closed = False

    async def send_text(self, text: str, finish: bool = False) -> None:
        await self.client._send(self.encode, TextPieceReq(rid=self.rid, reply_to=self.client.reply_addr, text=text,
                                                          finish=finish))

    async def next_output(self, timeout: float):
        """The next AudioOutput or ErrorOutput; asyncio.TimeoutError after `timeout` s of nothing."""
        out = await asyncio.wait_for(self.state.queue.get(), timeout=timeout)
        if isinstance(out, ErrorOutput) or (isinstance(out, AudioOutput) and out.finished):
            self.state.finished = True
        return out

    async def close(self) -> None:
        """Forget the request; unless it ended, drop it in every stage (interrupt, error, disconnect)."""
        if self.closed:
            return
        self.closed = True
        self.client.states.pop(self.rid, None)
        if not self.state.finished:
            await self.client.abort(self.rid, self.encode)
