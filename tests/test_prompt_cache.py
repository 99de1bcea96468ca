"""The decode engine's prompt cache (light_tts.server.decode.prompt_cache) on the tiny model, CPU, fp32.

A streaming row that continues its voice's cached prompt frames, and its own stream's frames from
earlier chunks, must give the mels and audio the uncached engine gives (and the plain streaming
reference), whatever else shares its batch: other voices, a voice twice, a prompt shorter than one
chunk, full-attention rows, a shorter first hop. The comparisons are sharp: a cache whose keys or
conv context are off changes the output. Also: the stable-frame rule, eviction and a voice that
finds no room, streams that grow, move, and recompute when the pool is short, the CUDA-graph
solver's buffers (replayed eagerly), and the decode server filling the cache while idle, before
the first tokens arrive, and freeing a stream's frames when its request ends or is aborted.
"""
import numpy as np
import pytest
import torch
import zmq

from light_tts.server.decode.batched_flow import EagerSolver
from light_tts.server.decode.cuda_graph import GraphSolver
from conftest import FAMILY_DIRS
from light_tts.server.decode.engine import DecodeEngine, fused_step
from light_tts.server.decode.fused_estimator import FusedEstimator
from light_tts.server.decode.prompt_cache import PromptCache, token_chunk
from light_tts.server.decode.process import DecodeServer, load_decode_model
from light_tts.server.io_struct import AbortReq, DecodeStartReq, SpeechTokensBatchOutput
from light_tts.server.ipc import Endpoints, bind_pull, read_stats
from light_tts.models.token2wav import Chunk, StreamingDecoder, StreamSchedule, Token2Wav, stream_chunks

ATOL = 1e-5


@pytest.fixture(scope="module")
def model(request):
    """(flow, hift, schedule) of the tiny CosyVoice2 model, or of the family a test's
    `both_families` mark asks for."""
    family = getattr(request, "param", "cosyvoice2")
    flow, hift = load_decode_model(request.getfixturevalue(FAMILY_DIRS[family]), "cpu", "fp32")
    torch.set_flush_denormal(True)
    try:
        yield flow, hift, StreamSchedule(pre_lookahead_len=flow.pre_lookahead_len)
    finally:
        torch.set_flush_denormal(False)


# The cache's exactness on both families (CosyVoice3: FusedDiT over the DiT flow, its causal HiFT);
# its bookkeeping (eviction, growing and moving streams, splits, fills, the decode server) is
# family-blind: CosyVoice2 only (CI time).
both_families = pytest.mark.parametrize("model", sorted(FAMILY_DIRS), indirect=True)


def _voices(flow, prompt_lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, flow.vocab_size, (n,), generator=g), torch.randn(2 * n, 80, generator=g),
             torch.randn(192, generator=g)) for n in prompt_lens]


def _tokens(flow, n, seed):
    return torch.randint(0, flow.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model, frames=None, solver=None, streams=True):
    """The fused estimator, eager; with a prompt cache of `frames` frames unless None (and its
    stream cache unless streams=False)."""
    flow, hift, _ = model
    engine = DecodeEngine(flow, hift)
    step = fused_step(flow.decoder.estimator)
    engine.flow.solver = solver(step) if solver else EagerSolver(flow.decoder, step, 10)
    if frames is not None:
        engine.flow.prompt_cache = PromptCache(step, 10, frames, flow.token_mel_ratio, flow.pre_lookahead_len,
                                               token_chunk(flow, step), "cpu", torch.float32, streams=streams)
    return engine


def _streams(model, engine, requests, schedule=None):
    """Every (voice, tokens, stream) request decoded in lockstep; audio chunks per request."""
    flow, hift, default = model
    schedule = schedule or default
    decoders = []
    for (pt, pf, emb), tokens, stream in requests:
        d = StreamingDecoder(Token2Wav(flow, hift, pt, pf, emb, schedule, seed=0), stream=stream)
        d.feed(tokens)
        d.end()
        decoders.append(d)
    out = [[] for _ in decoders]
    while any(d.ready for d in decoders):
        rows, owners = [], []
        for i, d in enumerate(decoders):
            chunk = d.next_chunk() if d.ready else None
            if chunk is not None:
                rows.append((d.t2w, chunk))
                owners.append(i)
        for i, audio in zip(owners, engine.run(rows)):
            assert not isinstance(audio, Exception), audio
            out[i].append(audio)
    return out


@torch.inference_mode()
def test_estimator_continues_a_recorded_prefix():
    """At the estimator level, on an estimator whose attention width (2 heads x 32) differs from its
    channels (32), chunks of 6 frames: record frames [0, 12) as a voice, then compute [12, 20) from
    it while recording its first whole chunk [12, 18) as a stream, then [18, 20) from both = the
    whole 20 computed at once."""
    from light_tts.server.decode.batched_flow import FrameAttention
    from light_tts.server.decode.prompt_cache import Recorder, RowPrefix, Target
    from light_tts.models.flow.estimator import CausalConditionalDecoder
    torch.manual_seed(0)
    est = CausalConditionalDecoder(in_channels=320, out_channels=80, channels=(32,), attention_head_dim=32,
                                   n_blocks=2, num_mid_blocks=2, num_heads=2, static_chunk_size=6).eval()
    for p in est.parameters():
        p.add_(0.05 * torch.randn_like(p))   # nonzero biases and norms
    fused = FusedEstimator(est)
    cache = PromptCache(fused, 1, 40, 2, 3, 3, "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    x, mu, cond = (torch.randn(2, 80, 20, generator=g) for _ in range(3))
    t, spks = torch.rand(2, generator=g), torch.randn(2, 80, generator=g)
    rows = lambda *v: torch.tensor(v, dtype=torch.int32)
    none = dict(prefix_start=rows(0, 0), prefix_len=rows(0, 0), stream_start=rows(0, 0), stream_len=rows(0, 0))

    def run(lo, hi, **kw):
        mask = torch.ones(2, 1, hi - lo)
        fa = FrameAttention(rows(hi - lo, hi - lo), rows(1, 1), **{**none, **kw}, branch_rows=1)
        return fused(x[:, :, lo:hi], mask, mu[:, :, lo:hi], t, spks, cond[:, :, lo:hi], fa)

    whole = run(0, 20)
    voice = cache._allocate(b"voice", 12, set())
    voice.start = 5   # not at slot 0
    record = Recorder.for_targets(cache, [Target(0, voice, 0, 12)], 1, 12)
    run(0, 12, record=record)
    record.finish()
    stream = cache._new_entry(25, 0, 6, base=12)
    prefix = RowPrefix(voice=voice)
    record = Recorder.for_targets(cache, [Target(0, stream, 0, 6)], 1, 8)
    rest = run(12, 20, prefix_start=rows(5, 5), prefix_len=rows(12, 12), cache=cache,
               ctx=cache.context([prefix], 1).flatten(0, 1), record=record)
    record.finish()
    assert float(whole.abs().max()) > 0.1
    torch.testing.assert_close(rest, whole[:, :, 12:], rtol=1e-5, atol=1e-5)
    assert stream.frames == 6
    prefix.stream = stream
    last = run(18, 20, prefix_start=rows(5, 5), prefix_len=rows(12, 12), stream_start=rows(25, 25),
               stream_len=rows(6, 6), cache=cache, ctx=cache.context([prefix], 1).flatten(0, 1))
    torch.testing.assert_close(last, whole[:, :, 18:], rtol=1e-5, atol=1e-5)


@both_families
def test_stable_frames_follow_the_chunk_rule(model):
    cache = _engine(model, frames=10).flow.prompt_cache
    # frame f depends on the tokens before 25 (f // 50 + 1) + 3: whole 50-frame chunks whose
    # tokens and 3 look-ahead tokens all lie in the prompt
    assert [cache.stable_frames(p) for p in (27, 28, 52, 53, 125, 123)] == [0, 50, 50, 100, 200, 200]


@pytest.fixture(scope="module")
def mixed(model):
    flow = model[0]
    a, b, c, short = _voices(flow, [63, 30, 80, 20])
    # voice a twice, a prompt under one chunk, a non-streaming request of a cached voice (a
    # stream's final chunk has full attention too, as the official: it never uses the cache)
    return [(a, _tokens(flow, 90, 1), True), (b, _tokens(flow, 70, 2), True), (c, _tokens(flow, 80, 3), True),
            (a, _tokens(flow, 60, 4), True), (short, _tokens(flow, 50, 5), True), (a, _tokens(flow, 45, 6), False)]


@both_families
@pytest.mark.parametrize("streams", [False, True])
def test_streams_with_the_cache_equal_the_streams_without(model, mixed, streams):
    flow, hift, schedule = model
    plain = _streams(model, _engine(model), mixed)
    engine = _engine(model, frames=2000, streams=streams)
    cached = _streams(model, engine, mixed)
    cache = engine.flow.prompt_cache
    # voices a, b, c filled once each; a's second request and a's second chunk reuse a
    assert cache.misses == 3 and cache.hits == 2
    assert sorted(e.frames for e in cache.entries.values()) == [50, 100, 150]
    # the second chunks continued their streams' first; every final chunk freed its stream
    assert (cache.stream_frames_reused > 0) == streams and not cache.streams
    for got, want, (voice, tokens, stream) in zip(cached, plain, mixed):
        assert len(got) == len(want)
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=0, atol=ATOL)
        ref = stream_chunks(iter(tokens), Token2Wav(flow, hift, *voice, schedule, seed=0), stream)
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(list(ref)), rtol=0, atol=ATOL)


@torch.inference_mode()
@both_families
def test_the_comparison_sees_a_wrong_cache(model, mixed):
    """Keys 1% off, or the conv context zeroed (what a cache without it would compute), move the
    mels past 10x the tolerance above: the equality is not vacuous."""
    flow, hift, schedule = model
    engine = _engine(model, frames=1000, streams=False)   # a chunk run three times: the voice alone
    voice, tokens, _ = mixed[0]
    t2w = Token2Wav(flow, hift, *voice, schedule, seed=0)
    rows = [(t2w, Chunk(torch.tensor(tokens[:schedule.first_hop(voice[0].numel()) + 3]), 0, False, True))]
    want = engine.flow(rows)[0]
    entry = next(iter(engine.flow.prompt_cache.entries.values()))
    assert entry.frames == 100 and float(want.abs().max()) > 0.1
    saved = entry.ctx.clone()
    entry.ctx.zero_()
    assert float((engine.flow(rows)[0] - want).abs().max()) > 100 * ATOL
    entry.ctx.copy_(saved)
    engine.flow.prompt_cache.kv.mul_(1.01)
    # (the tiny random DiT's attention adds little to its residual stream: 1% off keys and values
    # moves its mel ~30x the tolerance, the U-Net's far more)
    assert float((engine.flow(rows)[0] - want).abs().max()) > 10 * ATOL


@torch.inference_mode()
@pytest.mark.parametrize("wrong", ["keys", "context"])
@both_families
def test_the_comparison_sees_a_wrong_stream_cache(model, wrong):
    """A stream's cached frames 1% off, or its conv context zeroed, after its first chunk: its
    second chunk moves past 10x the tolerance of the equality tests."""
    flow, hift, schedule = model
    voice, = _voices(flow, [63], seed=5)
    tokens = _tokens(flow, 120, 9)

    def second_chunk(engine, spoil=None):
        t2w = Token2Wav(flow, hift, *voice, schedule, seed=0)
        d = StreamingDecoder(t2w, stream=True)
        d.feed(tokens)
        engine.run([(t2w, d.next_chunk())])
        if spoil is not None:
            spoil(engine.flow.prompt_cache.streams[t2w], engine.flow.prompt_cache)
        chunk = d.next_chunk()
        # the chunk's own frames (a stream's cached frames before them come back as zeros)
        return engine.flow([(t2w, chunk)])[0][:, :, chunk.offset * flow.token_mel_ratio:]

    want = second_chunk(_engine(model))
    assert float(want.abs().max()) > 0.1
    assert float((second_chunk(_engine(model, frames=2000)) - want).abs().max()) < ATOL

    def spoil(entry, cache):
        assert entry.frames == 100   # the first chunk's final frames, all it computed
        if wrong == "keys":
            cache.kv[entry.start:entry.start + entry.frames].mul_(1.01)
        else:
            entry.ctx.zero_()
    assert float((second_chunk(_engine(model, frames=2000), spoil) - want).abs().max()) > 10 * ATOL


def test_streams_grow_move_and_recompute_when_the_pool_is_short(model):
    """Three long streams in lockstep grow past their room (moving, copying their frames); in a
    pool too small for them, the rows that find no room recompute. Same audio either way."""
    flow = model[0]
    a, b, c = _voices(flow, [63, 30, 80], seed=8)
    requests = [(a, _tokens(flow, 200, 1), True), (b, _tokens(flow, 190, 2), True), (c, _tokens(flow, 180, 3), True)]
    want = _streams(model, _engine(model), requests)
    for frames, moves, short in ((4000, True, False), (700, None, True)):
        engine = _engine(model, frames=frames)
        got = _streams(model, engine, requests)
        cache = engine.flow.prompt_cache
        assert cache.stream_frames_reused > 0 and not cache.streams
        if moves:
            assert cache.stream_moves > 0 and cache.stream_fallbacks == 0
        if short:
            assert cache.stream_fallbacks > 0
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.concatenate(g), np.concatenate(w), rtol=0, atol=ATOL)


@both_families
def test_a_short_first_hop_keeps_only_final_frames(model, mixed):
    """--decode_first_hop 10: the first chunks end inside a 50-frame chunk, so a stream keeps only
    its whole chunks and recomputes the rest: still the uncached engine's audio."""
    from light_tts.models.token2wav import StreamSchedule
    flow = model[0]
    schedule = StreamSchedule(pre_lookahead_len=flow.pre_lookahead_len, first_hop_len=10)
    want = _streams(model, _engine(model), mixed, schedule)
    engine = _engine(model, frames=2000)
    got = _streams(model, engine, mixed, schedule)
    assert engine.flow.prompt_cache.stream_frames_reused > 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.concatenate(g), np.concatenate(w), rtol=0, atol=ATOL)


def test_split_by_frames_cuts_where_padding_costs_more_than_a_call():
    from light_tts.server.decode.batched_flow import split_by_frames
    exact = lambda rows, frames: (rows, frames)
    assert split_by_frames([300] * 8, exact) == [list(range(8))]
    # 63 first chunks after a cached prompt and one final chunk: two calls
    assert split_by_frames([100] * 63 + [800], exact) == [list(range(63)), [63]]
    # two rows: padding 700 frames is cheaper than another call
    assert sorted(map(sorted, split_by_frames([800, 100], exact))) == [[0, 1]]
    # buckets count: rows to a power of two make 33 rows cost 64
    pow2 = lambda rows, frames: (1 << (rows - 1).bit_length(), frames)
    assert [len(g) for g in split_by_frames([100] * 32 + [120], pow2, 0)] == [32, 1]


def test_split_batches_equal_one_batch(model, mixed):
    """The engine's rows split into several solver calls (every split worth it at no call cost)
    decode exactly as one padded call per engine call."""
    flow = model[0]

    class Counting(EagerSolver):
        def __call__(self, batch):
            self.calls = getattr(self, "calls", 0) + 1
            return self.run(batch)

    engines = []
    for cost in (0, 10 ** 9):
        engine = _engine(model, frames=1000, solver=lambda step: Counting(flow.decoder, step, 10))
        engine.flow.split_cost = cost
        engines.append(engine)
    split, one = (_streams(model, e, mixed) for e in engines)
    for got, want in zip(split, one):
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=0, atol=ATOL)
    assert engines[0].flow.solver.calls > engines[1].flow.solver.calls   # the rows were split


def test_eviction_and_a_voice_without_room(model):
    flow = model[0]
    a, b, c = _voices(flow, [63, 30, 80], seed=7)
    engine = _engine(model, frames=160, streams=False)   # voices only: streams take room (tested below)
    cache = engine.flow.prompt_cache
    # 60 tokens: each has a streaming chunk (the final chunk has full attention: never cached)
    _streams(model, engine, [(a, _tokens(flow, 60, 1), True), (b, _tokens(flow, 60, 2), True)])
    assert sorted(e.frames for e in cache.entries.values()) == [50, 100]
    # c (150 frames) beside a in one batch: a is in use, so c cannot fit even with b gone (b is
    # kept): c runs uncached and still equals the uncached engine
    requests = [(a, _tokens(flow, 60, 3), True), (c, _tokens(flow, 60, 4), True)]
    got = _streams(model, engine, requests)
    want = _streams(model, _engine(model), requests)
    assert sorted(e.frames for e in cache.entries.values()) == [50, 100]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.concatenate(g), np.concatenate(w), rtol=0, atol=ATOL)
    # alone, c takes the room of the least recently used voice
    _streams(model, engine, [(c, _tokens(flow, 60, 5), True)])
    assert sorted(e.frames for e in cache.entries.values()) == [150]


def test_a_failed_fill_leaves_its_rows_uncached_and_the_batch_running(model, mixed, caplog):
    engine = _engine(model, frames=1000)
    cache = engine.flow.prompt_cache

    def broken(flow, items):
        raise RuntimeError("out of memory (simulated)")
    cache._fill = broken
    got = _streams(model, engine, mixed)
    for g, w in zip(got, _streams(model, _engine(model), mixed)):
        np.testing.assert_allclose(np.concatenate(g), np.concatenate(w), rtol=0, atol=ATOL)
    assert not cache.entries and cache.misses == 0 and "filling" in caplog.text


@both_families
def test_graph_solver_buffers_carry_the_prefixes(model, mixed):
    """GraphSolver's bucketed static buffers (rows to a power of two, frames to the bucket, the
    prefixes and conv context among them) and its fill passes (the recorder's static tensors),
    replayed eagerly: same audio."""
    flow = model[0]

    class EagerReplay:   # stands in for a captured graph: re-runs the captured function
        def __init__(self, fn, output):
            self.fn, self.output = fn, output

        def replay(self):
            out = self.fn()
            if out is not None:
                self.output.copy_(out)

        def pool(self):
            return None

    class ReplaySolver(GraphSolver):
        def capture_fn(self, fn):
            out = fn()
            return EagerReplay(fn, out), out

    def solver(step):
        return ReplaySolver(flow.decoder, step, max_batch_size=8, frame_bucket=64)

    engine = _engine(model, frames=1000, solver=solver)
    got = _streams(model, engine, mixed)
    want = _streams(model, _engine(model), mixed)
    solver = engine.flow.solver
    # the padded path ran, for chunks and for fills
    assert not solver.failed and any(key[-2] > 1 for key in solver.graphs)   # keys end (rows, frames)
    # voice fills, and chunks of streams that keep their frames (with a cached prefix: ctx)
    assert any(key[0] == "fill" for key in solver.graphs) and any(key[0] == "record" for key in solver.graphs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.concatenate(g), np.concatenate(w), rtol=0, atol=ATOL)
    # a later fill of another size is a new capture, whose warm-up runs must not touch the cached
    # voices: voice a (slots from 0) still decodes as without the cache
    fills = sum(key[0] == "fill" for key in solver.graphs)
    cache = engine.flow.prompt_cache
    kept = {e.start: cache.kv[e.start:e.start + e.frames].clone() for e in cache.entries.values()}
    d, = _voices(flow, [130], seed=3)
    later = [(d, _tokens(flow, 60, 7), True), (mixed[0][0], _tokens(flow, 60, 8), True)]
    got = _streams(model, engine, later)
    assert sum(key[0] == "fill" for key in solver.graphs) == fills + 1
    for start, kv in kept.items():
        assert torch.equal(cache.kv[start:start + kv.size(0)], kv)
    for g, w in zip(got, _streams(model, _engine(model), later)):
        np.testing.assert_allclose(np.concatenate(g), np.concatenate(w), rtol=0, atol=ATOL)


def test_idle_decode_server_fills_the_cache_before_the_first_tokens(model, tmp_path):
    flow, hift, _ = model
    (pt, pf, emb), = _voices(flow, [63], seed=11)
    endpoints = Endpoints(root=str(tmp_path), encode_num=1, decode_num=1)
    endpoints.create()
    ctx = zmq.Context()
    pull = bind_pull(ctx, endpoints.http("test"))
    engine = _engine(model, frames=500)
    server = DecodeServer(endpoints, 0, flow, hift, ctx=ctx, engine=engine)
    try:
        server.handle_start(DecodeStartReq(rid="r1", reply_to=endpoints.http("test"), stream=True, speed=1.0, seed=0,
                                           prompt_speech_tokens=pt.numpy(), prompt_feat=pf.numpy(),
                                           embedding=emb.numpy()))
        server.step()   # nothing to decode yet: the voice is filled now
        cache = engine.flow.prompt_cache
        assert cache.misses == 1 and len(cache.entries) == 1 and not server.to_warm and cache.hits == 0
        # a request aborted before the decode process is idle is not warmed
        (other,) = _voices(flow, [80], seed=12)
        server.handle_start(DecodeStartReq(rid="r2", reply_to=endpoints.http("test"), stream=True, speed=1.0, seed=0,
                                           prompt_speech_tokens=other[0].numpy(),
                                           prompt_feat=other[1].numpy(), embedding=other[2].numpy()))
        server.handle_abort(AbortReq(rid="r2"))
        server.step()
        assert cache.misses == 1 and not server.to_warm
        server.handle_tokens(SpeechTokensBatchOutput(rids=["r1"], tokens=[_tokens(flow, 60, 1)], pieces=[0],
                                                     piece_done=[True], finished=[True]))
        while server.states:
            server.step()
        assert cache.misses == 1 and cache.hits >= 1     # its chunks found the voice cached
        # a stream keeps its chunk's final frames for the next; its abort frees them at once
        server.handle_start(DecodeStartReq(rid="r3", reply_to=endpoints.http("test"), stream=True, speed=1.0, seed=0,
                                           prompt_speech_tokens=pt.numpy(), prompt_feat=pf.numpy(),
                                           embedding=emb.numpy()))
        server.handle_tokens(SpeechTokensBatchOutput(rids=["r3"], tokens=[_tokens(flow, 60, 2)], pieces=[0],
                                                     piece_done=[False], finished=[False]))
        server.step()
        assert len(cache.streams) == 1 and cache.stream_frames_reused == 0
        server.handle_abort(AbortReq(rid="r3"))
        assert not cache.streams and not server.states
        server.publish_stats()                           # what /metrics shows
        stats = read_stats(endpoints)["decode:0"]
        assert stats["stream_cache_streams"] == 0
        assert (stats["prompt_cache_misses"], stats["prompt_cache_hits"], stats["prompt_cache_voices"]) == \
            (1, cache.hits, 1)
    finally:
        server.send_to_http.close()
        server.recv_from_peers.close()
        pull.close()
        ctx.term()
        endpoints.remove()


def test_a_stream_cache_without_a_prompt_cache_is_said_ignored(model, caplog):
    from light_tts.server.decode.engine import build_engine
    flow, hift, _ = model
    engine = build_engine(flow, hift, "cpu", stream_cache=True)
    assert engine.flow.prompt_cache is None and "--decode_stream_cache ignored" in caplog.text
