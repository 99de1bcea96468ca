"""The stage skeleton (light_tts.server.stage): the Dispatcher's failure rule over real ZeroMQ ipc
sockets, as a stage runs it: messages from a PULL socket, ErrorOutputs through ReplySockets to an
HTTP worker's PULL socket."""
import logging

import zmq

from light_tts.server.io_struct import (AbortReq, ErrorOutput, RequestError, SpeechTokensBatchOutput, TextPieceReq,
                                        TTSReq, VoiceDeleteReq, VoiceStoreReq, drain, sock_recv, sock_send)
from light_tts.server.ipc import ReplySockets, bind_pull, connect_push
from light_tts.server.stage import Dispatcher, Ticker


def test_dispatcher_fails_the_request_and_the_stage_keeps_serving(tmp_path, caplog):
    ctx = zmq.Context()
    http_addr = f"ipc://{tmp_path}/http.ipc"
    recv_from_peers = bind_pull(ctx, f"ipc://{tmp_path}/stage.ipc")
    peer = connect_push(ctx, f"ipc://{tmp_path}/stage.ipc")
    http = bind_pull(ctx, http_addr)
    send_to_http = ReplySockets(ctx)
    handled, dropped = [], []

    def refuse(msg):
        raise RequestError(404, f"unknown voice_id {msg.voice_id!r}")

    def crash(msg):
        raise ValueError("bad input in a handler")

    def drop(rid):   # the stage's clean-up; it holds the reply address of requests known by rid only
        dropped.append(rid)
        return http_addr if rid == "held" else None

    dispatch = Dispatcher("encode:0", {
        TTSReq: refuse, VoiceDeleteReq: crash, AbortReq: crash, SpeechTokensBatchOutput: crash,
        VoiceStoreReq: handled.append}, reply=send_to_http.send, drop=drop)
    try:
        sent = [TTSReq(rid="r404", reply_to=http_addr, mode="sft", tts_text="hi", voice_id="nobody"),
                TextPieceReq(rid="stray", reply_to=http_addr, text="no handler"),       # dropped, no reply
                VoiceDeleteReq(rid="boom", reply_to=http_addr, voice_id="v"),
                AbortReq(rid="held"),                                                   # no reply_to of its own
                SpeechTokensBatchOutput(rids=["x"], tokens=[[1]], pieces=[0], piece_done=[True], finished=[True]),
                VoiceStoreReq(rid="ok", reply_to=http_addr, voice_id="v", voice=None)]
        for msg in sent:
            sock_send(peer, msg)
        got = []
        with caplog.at_level(logging.WARNING, logger="lighttts"):
            while len(got) < len(sent):
                assert recv_from_peers.poll(5000), "a message did not arrive"
                for msg in drain(recv_from_peers):
                    got.append(msg)
                    dispatch(msg)

        assert [m.rid for m in handled] == ["ok"]               # served after every failure before it
        assert dropped == ["r404", "boom", "held"]              # the batch has no rid: nothing to drop
        assert dispatch.errors == 4
        replies = {}
        while http.poll(2000):
            out = sock_recv(http)
            replies[out.rid] = out
            if len(replies) == 3:
                break
        assert not http.poll(300)                               # nothing for the stray message or the batch
        assert set(replies) == {"r404", "boom", "held"}
        assert all(isinstance(r, ErrorOutput) and r.stage == "encode:0" for r in replies.values())
        assert (replies["r404"].status, replies["r404"].message) == (404, "unknown voice_id 'nobody'")
        assert (replies["boom"].status, replies["boom"].message) == (500, "encode failed: bad input in a handler")
        assert replies["held"].status == 500
        assert any("unexpected type TextPieceReq" in r.getMessage() for r in caplog.records)
    finally:
        send_to_http.close()
        ctx.destroy(linger=0)


def test_dispatcher_fail_for_one_row_of_a_batch(tmp_path):
    """What a batch handler does per row: fail that request only, answered at the address it held."""
    ctx = zmq.Context()
    http_addr = f"ipc://{tmp_path}/http.ipc"
    http = bind_pull(ctx, http_addr)
    send_to_http = ReplySockets(ctx)
    held = {"a": http_addr, "b": http_addr}
    dispatch = Dispatcher("decode:1", {}, reply=send_to_http.send, drop=lambda rid: held.pop(rid, None))
    try:
        dispatch.fail("a", IndexError("token 7000 out of range"))
        dispatch.fail("gone", ValueError("already dropped"))    # nothing held, no address: nobody told
        assert http.poll(5000)
        out = sock_recv(http)
        assert (out.rid, out.status, out.stage) == ("a", 500, "decode:1")
        assert out.message == "decode failed: token 7000 out of range"
        assert held == {"b": http_addr} and not http.poll(300)
    finally:
        send_to_http.close()
        ctx.destroy(linger=0)


def test_ticker_is_due_at_once_then_once_per_period():
    t = Ticker(0.5)
    assert t.due(10.0) and not t.due(10.2) and not t.due(10.49)
    assert t.due(10.5) and not t.due(10.9) and t.due(11.0)
