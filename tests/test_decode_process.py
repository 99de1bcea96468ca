"""The decode stage as the server runs it: a 'spawn' process on the tiny model, real ipc sockets.

The test plays the LLM (DecodeStartReq + SpeechTokensBatchOutput over one PUSH socket, in order) and
one HTTP worker (a PULL socket at its reply address). Audio must equal, bit for bit, what the
plain reference path (`stream_chunks`) makes of the same tokens, however they are split.
"""
import multiprocessing as mp
import os
import time

import numpy as np
import pytest
import torch
import zmq

from light_tts.frontend.frontend import Frontend
from light_tts.server.args import parse_args
from light_tts.server.decode.process import DecodeServer, cpu_threads, load_decode_model, run_decode_process
from light_tts.server.io_struct import (AbortReq, AudioOutput, DecodeStartReq, ErrorOutput, SpeechTokensBatchOutput,
                                        YieldGpuReq, drain, sock_recv, sock_send)
from light_tts.server.ipc import Endpoints, bind_pull, connect_push, read_stats, stage_health
from light_tts.audio_out import pcm16_bytes
from light_tts.models.token2wav import StreamingDecoder, StreamSchedule, Token2Wav, stream_chunks

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def voice(tiny_model_dir):
    with open(os.path.join(FIXTURES, "prompt_en.wav"), "rb") as f:
        return Frontend(tiny_model_dir).encode_voice(f.read(), PROMPT_TEXT)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, voice):
    """pcm bytes of the plain path, computed as the decode process computes (same threads, folded HiFT)."""
    flow, hift = load_decode_model(tiny_model_dir, "cpu", "fp32")
    schedule = StreamSchedule(pre_lookahead_len=flow.pre_lookahead_len)

    def make(tokens, stream, speed=1.0, seed=0):
        threads = torch.get_num_threads()
        torch.set_num_threads(cpu_threads())
        try:
            t2w = Token2Wav(flow, hift, torch.from_numpy(voice.speech_tokens), torch.from_numpy(voice.prompt_feat),
                            torch.from_numpy(voice.embedding), schedule, seed=seed)
            return [pcm16_bytes(c) for c in stream_chunks(iter(tokens), t2w, stream, speed)]
        finally:
            torch.set_num_threads(threads)
    return make


class Harness:
    def __init__(self, endpoints: Endpoints):
        self.ctx = zmq.Context()
        self.reply_to = endpoints.http("test")
        self.pull = bind_pull(self.ctx, self.reply_to)
        self.push = connect_push(self.ctx, endpoints.decode(0))
        self.n = 0

    def start(self, voice, stream, speed=1.0, seed=0, **override) -> str:
        self.n += 1
        rid = f"r{self.n}"
        fields = dict(prompt_speech_tokens=voice.speech_tokens, prompt_feat=voice.prompt_feat,
                      embedding=voice.embedding)
        fields.update(override)
        sock_send(self.push, DecodeStartReq(rid=rid, reply_to=self.reply_to, stream=stream, speed=speed, seed=seed, **fields))
        return rid

    def tokens(self, rid, tokens, piece=0, piece_done=False, finished=False):
        """One request's tokens as the LLM sends them: a batch of one row."""
        self.batch([(rid, tokens, piece, piece_done, finished)])

    def batch(self, rows):
        """One LLM step's batch: rows of (rid, tokens, piece, piece_done, finished)."""
        rids, tokens, pieces, piece_done, finished = (list(c) for c in zip(*rows))
        sock_send(self.push, SpeechTokensBatchOutput(rids=rids, tokens=[list(t) for t in tokens], pieces=pieces,
                                                     piece_done=piece_done, finished=finished))

    def send_split(self, rid, tokens, sizes, piece=0, finished=True):
        i, k = 0, 0
        while i < len(tokens):
            n = sizes[k % len(sizes)]
            last = i + n >= len(tokens)
            self.tokens(rid, tokens[i:i + n], piece, piece_done=last, finished=last and finished)
            i, k = i + n, k + 1

    def recv(self, timeout=30.0):
        if not self.pull.poll(int(timeout * 1000)):
            raise TimeoutError("no reply from the decode process")
        return sock_recv(self.pull)

    def collect(self, rids, timeout=60.0) -> dict:
        """Every reply until each rid finished or failed."""
        out = {rid: [] for rid in rids}
        open_ = set(rids)
        deadline = time.monotonic() + timeout
        while open_:
            msg = self.recv(max(0.1, deadline - time.monotonic()))
            out.setdefault(msg.rid, []).append(msg)
            if isinstance(msg, ErrorOutput) or msg.finished:
                open_.discard(msg.rid)
        return out

    def close(self):
        self.pull.close()
        self.push.close()
        self.ctx.term()


@pytest.fixture(scope="module")
def decoder(tiny_model_dir, tmp_path_factory):
    endpoints = Endpoints(root=str(tmp_path_factory.mktemp("ipc")), encode_num=1, decode_num=1)
    endpoints.create()
    args = parse_args(["--model_dir", tiny_model_dir, "--log_level", "warning"])
    proc = mp.get_context("spawn").Process(target=run_decode_process, args=(args, endpoints, 0), daemon=True)
    proc.start()
    harness = Harness(endpoints)
    try:
        deadline = time.monotonic() + 60
        while stage_health(endpoints)["decode:0"] != "ok":
            assert proc.is_alive(), "decode process died at start"
            assert time.monotonic() < deadline, stage_health(endpoints)
            time.sleep(0.1)
        yield harness, endpoints, proc
    finally:
        harness.close()
        proc.terminate()
        proc.join(10)
        endpoints.remove()


def _tokens(n, seed):
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _audio(msgs) -> bytes:
    assert all(isinstance(m, AudioOutput) for m in msgs), msgs
    assert msgs[-1].finished and msgs[-1].pcm == b"" and not any(m.finished for m in msgs[:-1])
    return b"".join(m.pcm for m in msgs)


def test_decoder_object_equals_reference_however_tokens_are_split(tiny_model_dir, voice, reference):
    # the incremental object itself: pushes of any size give the chunks of the per-token reference
    flow, hift = load_decode_model(tiny_model_dir, "cpu", "fp32")
    tokens = _tokens(140, 1)
    t2w = Token2Wav(flow, hift, torch.from_numpy(voice.speech_tokens), torch.from_numpy(voice.prompt_feat),
                    torch.from_numpy(voice.embedding), StreamSchedule(), seed=0)
    dec = StreamingDecoder(t2w, stream=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    try:
        chunks = dec.push(tokens[:45])
        assert chunks == []                       # first hop 43 (prompt 82 -> 100) + 3 lookahead = 46
        chunks += dec.push(tokens[45:46])
        assert len(chunks) == 1 and dec.offset == 43
        chunks += dec.push(tokens[46:]) + dec.finish()
    finally:
        torch.set_num_threads(threads)
    assert dec.done and not dec.ready
    assert [pcm16_bytes(c) for c in chunks] == reference(tokens, stream=True)
    with pytest.raises(ValueError):
        StreamingDecoder(t2w, stream=True, speed=1.5)


def test_streaming_is_bit_exact_and_first_audio_comes_early(decoder, voice, reference):
    h, endpoints, _ = decoder
    tokens = _tokens(150, 2)
    rid = h.start(voice, stream=True, seed=3)
    h.tokens(rid, tokens[:46])                    # exactly the first chunk's tokens
    first = h.recv()
    assert isinstance(first, AudioOutput) and first.rid == rid and not first.finished and first.pcm
    h.send_split(rid, tokens[46:], sizes=[1, 7, 30, 2, 19])
    msgs = [first] + h.collect([rid])[rid]
    ref = reference(tokens, stream=True, seed=3)
    assert len(msgs) - 1 == len(ref) >= 3        # one AudioOutput per chunk, then finished
    assert _audio(msgs) == b"".join(ref)
    assert len(_audio(msgs)) == 150 * 960 * 2     # 2 mel frames per token, 480 samples each, int16


def test_non_stream_with_speed_equals_reference(decoder, voice, reference):
    h, _, _ = decoder
    tokens = _tokens(60, 3)
    rid = h.start(voice, stream=False, speed=1.5, seed=5)
    h.send_split(rid, tokens, sizes=[25, 10])
    msgs = h.collect([rid])[rid]
    assert len(msgs) == 2 and _audio(msgs) == b"".join(reference(tokens, stream=False, speed=1.5, seed=5))


def test_two_sentences_in_order(decoder, voice, reference):
    h, _, _ = decoder
    a, b = _tokens(70, 4), _tokens(30, 5)
    rid = h.start(voice, stream=True, )
    h.send_split(rid, a, sizes=[20], piece=0, finished=False)
    h.send_split(rid, b, sizes=[11], piece=1, finished=True)
    msgs = h.collect([rid])[rid]
    ref_a, ref_b = reference(a, stream=True), reference(b, stream=True)   # each sentence on a fresh Token2Wav
    assert [m.pcm for m in msgs[:-1]] == ref_a + ref_b
    assert _audio(msgs) == b"".join(ref_a + ref_b)


def test_abort_stops_audio_and_frees_the_request(decoder, voice, reference):
    h, endpoints, _ = decoder
    tokens = _tokens(200, 6)
    rid = h.start(voice, stream=True)
    h.tokens(rid, tokens[:46])
    assert h.recv().rid == rid
    sock_send(h.push, AbortReq(rid=rid))
    h.send_split(rid, tokens[46:], sizes=[50])    # the LLM had already sent more: dropped
    # an abort that overtakes its start (two senders) is remembered: the late start is ignored
    sock_send(h.push, AbortReq(rid="late"))
    sock_send(h.push, DecodeStartReq(rid="late", reply_to=h.reply_to, prompt_speech_tokens=voice.speech_tokens,
                                     prompt_feat=voice.prompt_feat, embedding=voice.embedding, stream=True))
    h.tokens("late", tokens[:100], finished=True)
    other = h.start(voice, stream=False)
    h.tokens(other, tokens[:20], piece_done=True, finished=True)
    got = h.collect([other])
    assert set(got) == {other}                     # nothing more for the aborted requests
    assert _audio(got[other]) == b"".join(reference(tokens[:20], stream=False))
    deadline = time.monotonic() + 5
    while (read_stats(endpoints).get("decode:0") or {}).get("aborted", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    stats = read_stats(endpoints)["decode:0"]
    assert stats["active"] == 0 and stats["chunks"] >= 3 and stats["audio_seconds"] > 0


def test_errors_fail_one_request_and_the_process_keeps_serving(decoder, voice, reference):
    h, _, proc = decoder
    bad_start = h.start(voice, stream=True, prompt_feat=np.zeros((0, 80), np.float32))
    bad_tokens = h.start(voice, stream=True)
    bad_piece = h.start(voice, stream=True)
    good = h.start(voice, stream=True)
    tokens = _tokens(80, 9)
    # one step's batch: a bad row fails its own request only, the rows after it still count
    h.batch([(bad_start, _tokens(50, 7), 0, True, True),          # dropped: no state
             (bad_tokens, [7000] * 50, 0, True, True),            # outside the 6561-token vocabulary
             (bad_piece, _tokens(10, 8), 1, True, True),          # sentence 1 before sentence 0
             (good, tokens[:33], 0, False, False)])
    h.send_split(good, tokens[33:], sizes=[33])
    got = h.collect([bad_start, bad_tokens, bad_piece, good])
    for rid in (bad_start, bad_tokens, bad_piece):
        assert len(got[rid]) == 1 and isinstance(got[rid][0], ErrorOutput), got[rid]
        err = got[rid][0]
        assert err.status == 500 and err.stage == "decode:0" and err.message.startswith("decode failed")
    assert "prompt" in got[bad_start][0].message
    assert _audio(got[good]) == b"".join(reference(tokens, stream=True))
    assert proc.is_alive()


def test_interleaved_requests_both_complete(decoder, voice, reference):
    h, _, _ = decoder
    ta, tb = _tokens(120, 10), _tokens(90, 11)
    a = h.start(voice, stream=True, seed=1)
    b = h.start(voice, stream=False, seed=2)
    for i in range(0, 120, 15):                   # one batch per LLM step: a row for each request still going
        rows = [(a, ta[i:i + 15], 0, i + 15 >= 120, i + 15 >= 120)]
        if i < 90:
            rows.append((b, tb[i:i + 15], 0, i + 15 >= 90, i + 15 >= 90))
        h.batch(rows)
    got = h.collect([a, b])
    # a and b share batched flow/HiFT calls: equal to decoding each alone up to float rounding
    # (GEMM blocking depends on the batch), i.e. within a PCM16 step or two
    _assert_pcm_close(_audio(got[a]), b"".join(reference(ta, stream=True, seed=1)))
    _assert_pcm_close(_audio(got[b]), b"".join(reference(tb, stream=False, seed=2)))


def _assert_pcm_close(got: bytes, ref: bytes, steps: int = 2) -> None:
    x, y = np.frombuffer(got, "<i2").astype(np.int32), np.frombuffer(ref, "<i2").astype(np.int32)
    assert x.shape == y.shape and np.abs(x - y).max() <= steps, (x.shape, y.shape)


def _state(rid, sent_s=None, started=0.0, stream=True):
    """A DecodeState that has sent sent_s seconds of audio since `started` (None: nothing yet)."""
    from light_tts.server.decode.process import DecodeState
    s = DecodeState(req=DecodeStartReq(rid=rid, reply_to="x", stream=stream, prompt_speech_tokens=np.zeros(1, np.int32),
                                       prompt_feat=np.zeros((2, 80), np.float32), embedding=np.zeros(192, np.float32)))
    if sent_s is not None:
        s.first_audio_at, s.audio_out_s = started, sent_s
    return s


def test_calls_with_first_chunks_of_streams_ask_the_llm_to_yield(tiny_model_dir, voice, reference, tmp_path):
    """--first_chunk_priority on the LLM's GPU: a call that computes first chunks of streams is
    bracketed by YieldGpuReq start/end naming those streams (not a non-streaming request in the same
    call); later chunks send none; the audio is the reference's."""
    flow, hift = load_decode_model(tiny_model_dir, "cpu", "fp32")
    endpoints = Endpoints(root=str(tmp_path), encode_num=1, decode_num=1)
    endpoints.create()
    ctx = zmq.Context()
    http, llm = bind_pull(ctx, endpoints.http("test")), bind_pull(ctx, endpoints.llm)
    server = DecodeServer(endpoints, 0, flow, hift, ctx=ctx, yield_to_llm=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())

    def yields(n, timeout=10.0):
        got, deadline = [], time.monotonic() + timeout
        while len(got) < n and llm.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            got += drain(llm)
        return got
    try:
        tokens = _tokens(120, 4)
        for rid, stream in (("s", True), ("n", False)):
            server.handle_start(DecodeStartReq(rid=rid, reply_to=endpoints.http("test"), stream=stream, seed=0,
                                               prompt_speech_tokens=voice.speech_tokens, prompt_feat=voice.prompt_feat,
                                               embedding=voice.embedding))
        server.handle_tokens(SpeechTokensBatchOutput(rids=["s", "n"], tokens=[tokens[:60], tokens[:60]], pieces=[0, 0],
                                                     piece_done=[False, True], finished=[False, True]))
        server.step()                                   # s's first chunk and n's whole audio, one call
        assert server.batch_sizes == {2: 1}
        msgs = yields(2)
        assert all(isinstance(m, YieldGpuReq) and m.decoder == 0 for m in msgs)
        assert [(m.rids, m.running) for m in msgs] == [(["s"], True), (["s"], False)]
        # a stream still waiting for tokens with under URGENT_SLACK_S buffered: no yield for a new first chunk
        server.states["s"].first_audio_at -= 60.0
        server.handle_start(DecodeStartReq(rid="t", reply_to=endpoints.http("test"), stream=True, seed=0,
                                           prompt_speech_tokens=voice.speech_tokens, prompt_feat=voice.prompt_feat,
                                           embedding=voice.embedding))
        server.handle_tokens(SpeechTokensBatchOutput(rids=["t"], tokens=[tokens[:60]], pieces=[0], piece_done=[True],
                                                     finished=[True]))
        server.step()
        assert server.states["t"].audio_sent or "t" not in server.states
        server.handle_tokens(SpeechTokensBatchOutput(rids=["s"], tokens=[tokens[60:]], pieces=[0], piece_done=[True],
                                                     finished=[True]))
        while server.states:
            server.step()
        assert yields(1, timeout=0.5) == []             # t's first chunk beside a starving s, later chunks: nothing
        out = {}
        while http.poll(1000):
            m = sock_recv(http)
            out.setdefault(m.rid, []).append(m)
        # batched together: the reference up to float rounding (test_interleaved_requests_both_complete)
        _assert_pcm_close(_audio(out["s"]), b"".join(reference(tokens, stream=True)))
        _assert_pcm_close(_audio(out["n"]), b"".join(reference(tokens[:60], stream=False)))
    finally:
        torch.set_num_threads(threads)
        server.send_to_http.close()
        ctx.destroy(linger=0)


def test_pick_batch_serves_first_chunks_before_streams_with_audio_to_spare():
    from light_tts.server.decode.process import URGENT_SLACK_S, pick_batch
    now = 100.0
    relaxed = _state("relaxed", sent_s=5.0, started=now - 1.0)                  # 4 s buffered
    dry = _state("dry", sent_s=2.0, started=now - 2.0 + URGENT_SLACK_S / 2)     # about to run dry
    drier = _state("drier", sent_s=1.0, started=now - 1.2)                      # already short
    new1, new2 = _state("new1"), _state("new2")
    ready = [relaxed, dry, new1, drier, new2]
    # first chunks wait: they run with the streams about to run dry (driest first), not the relaxed one
    assert [s.req.rid for s in pick_batch(ready, 8, now)] == ["drier", "dry", "new1", "new2"]
    assert [s.req.rid for s in pick_batch(ready, 3, now)] == ["drier", "dry", "new1"]
    # no first chunk waiting: every ready request, in the given (round-robin) order
    assert [s.req.rid for s in pick_batch([relaxed, dry, drier], 8, now)] == ["relaxed", "dry", "drier"]
    assert pick_batch([relaxed, dry], 1, now) == [relaxed]
    assert pick_batch([], 8, now) == []
    # a non-streaming request past its first sentence is never held back (its client waits for all)
    whole = _state("whole", sent_s=5.0, started=now - 1.0, stream=False)
    assert [s.req.rid for s in pick_batch([relaxed, whole, new1], 8, now)] == ["whole", "new1"]
