"""LLM stage: the plain batched KV cache, and the real process over ZeroMQ ipc sockets (spawned once
per module; tokens checked against the offline reference)."""
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections import namedtuple

import numpy as np
import pytest
import torch
import zmq

from light_tts.models.cosyvoice2 import CosyVoice2Model
from light_tts.server import io_struct
from light_tts.server.args import parse_args
from light_tts.server.io_struct import (AbortReq, DecodeStartReq, ErrorOutput, LLMReq, SpeechTokensBatchOutput,
                                        YieldGpuReq)
from light_tts.server.ipc import Endpoints, bind_pull, connect_push, read_stats
from light_tts.server.llm.process import run_llm_process

REPLY = "w0"
# One row of a SpeechTokensBatchOutput: one request's new tokens of one LLM step.
Row = namedtuple("Row", "rid tokens piece piece_done finished")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return CosyVoice2Model.from_pretrained(tiny_model_dir, components=("llm",)).llm


def make_req(rid, pieces, *, prompt_text=(5, 6, 7), prompt_speech=(11, 12, 13, 14), seed=0, reply_to="",
             max_speech_tokens=None, fixed_speech_tokens=None):
    decode = DecodeStartReq(rid=rid, reply_to=reply_to, prompt_speech_tokens=np.array(prompt_speech, np.int32),
                            prompt_feat=np.zeros((2 * len(prompt_speech), 80), np.float32),
                            embedding=np.zeros(192, np.float32))
    return LLMReq(rid=rid, reply_to=reply_to, text_pieces=[list(p) for p in pieces],
                  prompt_text_ids=np.array(prompt_text, np.int32), prompt_speech_tokens=np.array(prompt_speech, np.int32),
                  decode=decode, seed=seed, max_speech_tokens=max_speech_tokens,
                  fixed_speech_tokens=fixed_speech_tokens)


def reference(lm, req, greedy=False):
    """What the offline path (light_tts.synthesize) generates: one inference call per piece."""
    return [list(lm.inference(p, req.prompt_text_ids.tolist(), req.prompt_speech_tokens.tolist(), seed=req.seed,
                              greedy=greedy, max_new_tokens=req.max_speech_tokens,
                              fixed_new_tokens=req.fixed_speech_tokens)) for p in req.text_pieces]


def text(n, start=100):
    return list(range(start, start + n))


# ---- in process -------------------------------------------------------------------------------

def test_batch_kv_cache_decode_equals_batch_one(lm):
    """Rows of different lengths decoding in one padded + masked forward equal batch-1 decoding."""
    torch.manual_seed(0)
    body, D = lm.llm.model.model, lm.llm_input_size
    from light_tts.models.qwen2 import BatchKVCache
    prompts = [torch.randn(1, n, D) for n in (5, 11, 8)]
    steps = [torch.randn(len(prompts), 1, D) for _ in range(4)]
    with torch.inference_mode():
        ref_caches = [lm.new_cache() for _ in prompts]
        batch = BatchKVCache(len(body.layers), initial_rows=1, initial_capacity=4)  # must grow both ways
        for p, c in zip(prompts, ref_caches):
            lm(p, c, last_only=True)
            batch.add_row(c)
        assert batch.lengths == [5, 11, 8]
        for t, x in enumerate(steps):
            if t == 2:  # drop the middle row: the last row moves into its place
                assert batch.remove_row(1) == 2
                del ref_caches[1]
                x_rows = x[[0, 2]]
            else:
                x_rows = x if t < 2 else x[[0, 2]]
            want = torch.cat([lm(x_rows[b:b + 1], c, last_only=True) for b, c in enumerate(ref_caches)])
            pos, mask = batch.decode_layout()
            got = lm.llm_decoder(body(x_rows, batch, positions=pos, attention_mask=mask)[:, -1])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert batch.lengths == [c.seq_len for c in ref_caches]


# The engine itself (token equality, pool, router) is tested in test_llm_engine.py.


# ---- the real process over ZeroMQ ---------------------------------------------------------------

class Harness:
    """Plays encode (pushes LLMReq), both decoders and one HTTP worker (PULL sockets)."""

    def __init__(self, model_dir):
        self.root = tempfile.mkdtemp(prefix="ltllm")  # short path: ipc addresses are limited to ~100 chars
        self.endpoints = Endpoints(root=self.root + "/inst", encode_num=1, decode_num=2)
        self.endpoints.create()
        self.args = parse_args(["--model_dir", model_dir, "--max_req_total_len", "400", "--max_total_token_num", "2000",
                                "--log_stats_interval", "0.2", "--log_level", "info"])
        self.ctx = zmq.Context()
        self.decoders = [bind_pull(self.ctx, self.endpoints.decode(i)) for i in range(2)]
        self.http = bind_pull(self.ctx, self.endpoints.http(REPLY))
        self.to_llm = connect_push(self.ctx, self.endpoints.llm)
        self.proc = mp.get_context("spawn").Process(target=run_llm_process, args=(self.args, self.endpoints), daemon=True)
        # CPU fp32 like the reference in this process, even on a machine with a GPU.
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        try:
            self.proc.start()
        finally:
            if saved is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        self.msgs = []     # (source, message) in arrival order per source; a batch as its Rows
        self.batches = []  # (source, SpeechTokensBatchOutput) as received

    def send(self, msg):
        io_struct.sock_send(self.to_llm, msg)

    def req(self, rid, pieces, **kw):
        return make_req(rid, pieces, reply_to=self.endpoints.http(REPLY), **kw)

    def pump(self, until, timeout=20.0):
        """Receive into self.msgs until `until()` is true."""
        poller = zmq.Poller()
        socks = {s: f"decode{i}" for i, s in enumerate(self.decoders)}
        socks[self.http] = "http"
        for s in socks:
            poller.register(s, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while not until():
            assert self.proc.is_alive(), "the LLM process died"
            assert time.monotonic() < deadline, "timed out waiting for the LLM process"
            for s, _ in poller.poll(100):
                for m in io_struct.drain(s):
                    if isinstance(m, SpeechTokensBatchOutput):
                        self.batches.append((socks[s], m))
                        self.msgs += [(socks[s], Row(*row)) for row in m.rows()]
                    else:
                        self.msgs.append((socks[s], m))

    def settle(self, seconds):
        end = time.monotonic() + seconds
        self.pump(lambda: time.monotonic() >= end)

    def wait_stats(self, pred, timeout=5.0):
        """The LLM's published stats once `pred(stats)` holds (they are written every 0.5 s)."""
        stats = {}

        def ready():
            stats.update(read_stats(self.endpoints).get("llm", {}))
            return pred(stats)
        self.pump(ready, timeout)
        return stats

    def of(self, rid):
        return [(src, m) for src, m in self.msgs if m.rid == rid]

    def finished(self, rid):
        return any(isinstance(m, Row) and m.finished or isinstance(m, ErrorOutput)
                   for _, m in self.of(rid))

    def close(self):
        self.proc.terminate()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    h = Harness(tiny_model_dir)
    yield h
    h.close()


def test_process_concurrent_requests_equal_reference_and_balance_decoders(server, lm):
    first = [server.req("r1", [text(4)], seed=11, max_speech_tokens=40),
             server.req("r2", [text(2, 200), text(3, 400)], seed=12, max_speech_tokens=20),
             server.req("r3", [text(6)], seed=None, max_speech_tokens=35)]
    later = [server.req("r4", [text(3)], seed=14, fixed_speech_tokens=17),
             server.req("r5", [text(1)], seed=15)]
    for r in first:
        server.send(r)
    server.pump(lambda: sum(isinstance(m, Row) for _, m in server.msgs) >= 6)
    for r in later:  # arrive while the first ones are decoding
        server.send(r)
    reqs = first + later
    server.pump(lambda: all(server.finished(r.rid) for r in reqs))

    used = set()
    for r in reqs:
        msgs = server.of(r.rid)
        srcs = {src for src, _ in msgs}
        assert len(srcs) == 1 and srcs != {"http"}, (r.rid, srcs)   # one decoder, no errors
        used |= srcs
        assert isinstance(msgs[0][1], DecodeStartReq)              # conditioning first
        outs = [m for _, m in msgs[1:]]
        assert all(isinstance(m, Row) for m in outs)
        assert [m.piece for m in outs if m.piece_done] == list(range(len(r.text_pieces)))
        assert [m.finished for m in outs] == [False] * (len(outs) - 1) + [True]
        got = [[] for _ in r.text_pieces]
        for m in outs:
            got[m.piece] += m.tokens
        if r.seed is None:  # a random seed: still within the bounds
            assert len(got[0]) <= 35
        else:
            assert got == reference(lm, r), r.rid
    assert used == {"decode0", "decode1"}
    r4 = [m for _, m in server.of("r4") if isinstance(m, Row)]
    assert sum(len(m.tokens) for m in r4) == 17  # fixed_speech_tokens gives exactly N

    stats = server.wait_stats(lambda s: s.get("finished") == 5)
    assert stats["max_batch_size"] > 1 and stats["running"] == 0
    assert stats["kv_used"] == 0 and stats["decode_load"] == [0, 0] and stats["kv_total"] == 2000
    assert stats["kv_free"] + stats["kv_cached"] == 2000 and stats["prefix_hits"] > 0


def test_process_rejects_too_long_aborts_and_survives_bad_requests(server, lm):
    server.send(server.req("big", [text(100)], max_speech_tokens=300))  # 2+3+100+4+300 = 409 > 400
    server.send(server.req("bad", [[10**6]], max_speech_tokens=5))      # out-of-vocabulary id: 400
    server.send(server.req("slow", [text(5)], fixed_speech_tokens=300))
    server.pump(lambda: server.finished("big") and server.finished("bad")
                and sum(len(m.tokens) for _, m in server.of("slow") if isinstance(m, Row)) >= 5)
    (src, err), = server.of("big")
    assert src == "http" and err.status == 400 and "max_req_total_len" in err.message and err.stage == "llm"
    (src, err), = server.of("bad")
    assert src == "http" and err.status == 400 and "out of range" in err.message

    server.send(AbortReq(rid="slow"))
    server.send(AbortReq(rid="early"))                         # before its LLMReq: remembered
    server.send(server.req("early", [text(2)], max_speech_tokens=5))
    server.send(server.req("after", [text(2)], seed=3, max_speech_tokens=10))
    server.pump(lambda: server.finished("after"))
    n = len(server.of("slow"))
    server.settle(0.3)
    # after the abort only an AbortReq, to its decoder: the abort may have come from the encode stage
    # alone (a bistream request whose text failed), which the decoder would not hear of otherwise
    tail = server.of("slow")[n:]
    assert not server.finished("slow") and not any(isinstance(m, Row) for _, m in tail)
    aborts = [src for src, m in server.of("slow") if isinstance(m, AbortReq)]
    assert aborts == [server.of("slow")[0][0]]
    assert n - 1 < 300 and not server.of("early")
    got = [m.tokens for _, m in server.of("after") if isinstance(m, Row)]
    assert [t for ts in got for t in ts] == reference(lm, server.req("after", [text(2)], seed=3, max_speech_tokens=10))[0]

    stats = server.wait_stats(lambda s: s.get("running") == 0 and s.get("aborted") == 2)
    assert stats["rejected"] == 2 and stats["errors"] == 0 and stats["waiting"] == 0 and stats["kv_used"] == 0


def test_process_sends_one_token_batch_per_decoder_per_step(server, lm):
    """Tokens go to a decoder as at most one SpeechTokensBatchOutput per LLM step, a row per request
    of that decoder, each rid's DecodeStartReq first; the tokens per rid still equal the reference."""
    before = server.wait_stats(lambda s: s.get("running") == 0 and s.get("waiting") == 0, timeout=120)
    first_batch = len(server.batches)
    reqs = [server.req(f"b{i}", [text(3, 100 + 10 * i)], seed=20 + i, fixed_speech_tokens=12 + i) for i in range(6)]
    for r in reqs:
        server.send(r)
    server.pump(lambda: all(server.finished(r.rid) for r in reqs))
    after = server.wait_stats(lambda s: s.get("finished") == before["finished"] + len(reqs) and s.get("running") == 0)
    steps = after["steps"] - before["steps"]

    batches = server.batches[first_batch:]
    for src in ("decode0", "decode1"):
        mine = [b for s, b in batches if s == src]
        assert 0 < len(mine) <= steps, (src, len(mine), steps)          # at most one per step
        assert any(len(b.rids) > 1 for b in mine)                         # requests share a message
        assert all(len(set(b.rids)) == len(b.rids) for b in mine)         # a row per request
    for r in reqs:
        msgs = server.of(r.rid)
        (src,) = {s for s, _ in msgs}
        assert isinstance(msgs[0][1], DecodeStartReq), r.rid              # conditioning first, same socket
        rows = [m for _, m in msgs[1:]]
        assert all(isinstance(m, Row) for m in rows) and rows[-1].finished
        assert [t for m in rows for t in m.tokens] == reference(lm, r)[0], r.rid


def test_process_yields_to_first_chunks_and_loses_nothing(server, lm):
    """YieldGpuReq (a decoder on the LLM's GPU runs first chunks): streams whose first chunk has
    started get no tokens until the call ends, the others keep going; a yield whose end never comes
    lapses; the tokens equal the reference all the same."""
    before = server.wait_stats(lambda s: s.get("running") == 0 and s.get("waiting") == 0, timeout=120)
    y1, y2, y3 = (server.req(f"y{i}", [text(3, 500 + 10 * i)], seed=40 + i, fixed_speech_tokens=300) for i in (1, 2, 3))
    count = lambda rid: sum(len(m.tokens) for _, m in server.of(rid) if isinstance(m, Row))
    server.send(y1)
    server.send(y2)
    server.pump(lambda: count("y1") >= 5 and count("y2") >= 5)

    def yielding_until(pred):   # a decoder in a long call: the start repeated, so the yield never lapses here
        def until():
            server.send(YieldGpuReq(decoder=0, rids=["y1"], running=True))
            return pred()
        server.pump(until)
    n2 = count("y2")
    yielding_until(lambda: count("y2") >= n2 + 30)       # the yield is in force, y1's earlier rows are in
    n1, n2 = count("y1"), count("y2")
    yielding_until(lambda: count("y2") >= n2 + 60)
    assert count("y1") == n1, (n1, count("y1"))          # held: not one token while y2 made 60
    server.send(YieldGpuReq(decoder=0, rids=["y1"], running=False))
    server.pump(lambda: server.finished("y1") and server.finished("y2"))
    # a yield without its end (a decoder that failed mid-call) lapses after YIELD_MAX_S
    server.send(y3)
    server.pump(lambda: count("y3") >= 5)
    server.send(YieldGpuReq(decoder=0, rids=["y3"], running=True))
    server.pump(lambda: server.finished("y3"), timeout=60)
    for r in (y1, y2, y3):
        assert [t for _, m in server.of(r.rid) if isinstance(m, Row) for t in m.tokens] == reference(lm, r)[0], r.rid
    after = server.wait_stats(lambda s: s.get("finished") == before["finished"] + 3 and s.get("running") == 0)
    assert after["gpu_yields"] - before["gpu_yields"] >= 3 and after["held_steps"] > before["held_steps"]


def test_stats_line_names_errors_only_when_there_are_some():
    """Operators grep logs for 'error': 'errors 0' on every stats line matched them all."""
    from light_tts.server.llm.process import stats_line
    s = dict(running=1, waiting=0, batch_size=1, max_batch_size=4, steps=10, generated_tokens=9, kv_used=30,
             kv_total=2000, kv_cached=5, prefix_hits=1, prefix_misses=2, finished=3, aborted=0, rejected=0,
             errors=0, paused=0, decode_load=[1, 0])
    assert "error" not in stats_line(s).lower() and "running 1" in stats_line(s)
    assert stats_line(dict(s, errors=2)).endswith(" errors 2")

