"""The batched decode engine (light_tts.decode) on the tiny models, CPU, fp32.

Batching: requests of different prompt and token lengths, streaming and final chunks mixed in one
flow call (and for CosyVoice2 one HiFT call; CosyVoice3's causal HiFT runs per row), equal decoding
each alone (float rounding only); the streamed chunks equal the offline streaming reference
(stream_chunks). Both families for the flow; the HiFT tests are CosyVoice2's batched HiFT. Also: the estimator's ONNX export against
PyTorch under onnxruntime, the worker -> GPU assignment, and the --load_trt start-up message.
"""
import os
import sys

import numpy as np
import pytest
import torch

from light_tts.server.decode.batched_flow import BiasEstimator
from light_tts.server.decode.engine import DecodeEngine
from light_tts.server.decode.placement import decode_device, physical_gpu, visible_gpus
from light_tts.server.decode.process import load_decode_model
from light_tts.models.token2wav import StreamingDecoder, StreamSchedule, Token2Wav, stream_chunks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    flow, hift = load_decode_model(tiny_model_dir, "cpu", "fp32")
    torch.set_flush_denormal(True)  # as the decode process on CPU: subnormals make these random inputs 10x slower
    try:
        yield flow, hift, StreamSchedule(pre_lookahead_len=flow.pre_lookahead_len)
    finally:
        torch.set_flush_denormal(False)


@pytest.fixture(scope="module", params=["cosyvoice2", "cosyvoice3"])
def family_model(request):
    """The `model` fixture's triple for each family's tiny model."""
    if request.param == "cosyvoice2":
        yield request.getfixturevalue("model")
        return
    flow, hift = load_decode_model(request.getfixturevalue("tiny_cv3_model_dir"), "cpu", "fp32")
    torch.set_flush_denormal(True)
    try:
        yield flow, hift, StreamSchedule(pre_lookahead_len=flow.pre_lookahead_len)
    finally:
        torch.set_flush_denormal(False)


def _requests(flow, specs):
    """(prompt tokens, prompt feat, embedding, speech tokens, seed) per (prompt len, tokens, seed)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for tp, n, seed in specs:
        out.append((torch.randint(0, flow.vocab_size, (tp,), generator=g), torch.randn(2 * tp, 80, generator=g),
                    torch.randn(192, generator=g), torch.randint(0, flow.vocab_size, (n,), generator=g).tolist(),
                    seed))
    return out


def _t2w(model, req, schedule=None):
    flow, hift, sch = model
    return Token2Wav(flow, hift, req[0], req[1], req[2], schedule or sch, seed=req[4])


def _run_batched(engine, decoders):
    """Drive the decoders in lockstep: every iteration one engine call over all ready chunks."""
    out = [[] for _ in decoders]
    batches = []
    while any(d.ready for d in decoders):
        rows, owners = [], []
        for i, d in enumerate(decoders):
            if d.ready:
                chunk = d.next_chunk()
                if chunk is not None:
                    rows.append((d.t2w, chunk))
                    owners.append(i)
        batches.append(rows)
        for i, audio in zip(owners, engine.run(rows)):
            assert not isinstance(audio, Exception), audio
            out[i].append(audio)
    return out, batches


def test_batched_equals_each_alone_and_the_streaming_reference(family_model):
    model = family_model
    flow, hift, _ = model
    reqs = _requests(flow, [(13, 70, 0), (30, 120, 5), (47, 40, 7)])
    alone = [list(stream_chunks(iter(r[3]), _t2w(model, r), stream=True)) for r in reqs]
    decoders = [StreamingDecoder(_t2w(model, r), stream=True) for r in reqs]
    for d, r in zip(decoders, reqs):
        d.feed(r[3])
        d.end()
    got, batches = _run_batched(DecodeEngine(flow, hift), decoders)
    # the batches really mix: 3 rows of different lengths, then streaming and final rows together
    assert len(batches[0]) == 3 and len({c.tokens.shape[0] for _, c in batches[0]}) == 3
    assert len({c.tokens.shape[0] + t.prompt_tokens.shape[1] for t, c in batches[0]}) == 2
    assert {c.streaming for _, c in batches[1]} == {True, False}
    for ref, out in zip(alone, got):
        assert len(ref) == len(out)
        for a, b in zip(ref, out):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
        # streamed chunks joined = the offline streaming reference joined
        np.testing.assert_allclose(np.concatenate(out), np.concatenate(ref), rtol=0, atol=1e-5)


def test_causal_vocoder_windows_of_equal_length_share_a_decode_call(tiny_cv3_model_dir):
    """CosyVoice3: streams in step (same prompt and hop lengths, different tokens and voices) decode
    their bounded vocoder windows in one call, with each stream's audio as decoded alone."""
    flow, hift = load_decode_model(tiny_cv3_model_dir, "cpu", "fp32")
    model = (flow, hift, StreamSchedule(pre_lookahead_len=flow.pre_lookahead_len))
    reqs = _requests(flow, [(20, 130, 0), (20, 130, 1), (20, 130, 2)])
    alone = [list(stream_chunks(iter(r[3]), _t2w(model, r), stream=True)) for r in reqs]
    decoders = [StreamingDecoder(_t2w(model, r), stream=True) for r in reqs]
    for d, r in zip(decoders, reqs):
        d.feed(r[3])
        d.end()
    engine = DecodeEngine(flow, hift)
    decode_rows = []
    decode = hift.decode
    hift.decode = lambda mel, *a: decode_rows.append(mel.shape[0]) or decode(mel, *a)
    try:
        got, batches = _run_batched(engine, decoders)
    finally:
        del hift.decode
    assert decode_rows == [3] * len(batches) and len(batches) >= 3
    for ref, out in zip(alone, got):
        assert [len(a) for a in ref] == [len(b) for b in out]
        for a, b in zip(ref, out):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_bucket_padding_is_invisible(family_model):
    model = family_model
    """CUDA graphs pad rows to a power of two, frames to FRAME_BUCKET and the encoder's tokens to
    FRAME_BUCKET / 2: same mels (run eagerly here)."""
    from light_tts.server.decode.batched_flow import BatchedFlow, EagerSolver, RowEncoder
    from light_tts.server.decode.cuda_graph import GraphEncoder, GraphSolver
    from light_tts.models.token2wav import Chunk

    class PaddedEager(GraphSolver):   # GraphSolver's buckets, EagerSolver's execution (no CUDA here)
        __call__ = EagerSolver.__call__

    flow, hift, _ = model
    reqs = _requests(flow, [(13, 60, 0), (30, 60, 1), (47, 60, 2)])
    rows = [(_t2w(model, r), Chunk(torch.tensor(r[3][:k]), 0, finalize=f, streaming=not f))
            for r, k, f in zip(reqs, (40, 48, 31), (False, True, False))]
    class EagerReplay:   # stands in for a captured graph: runs the encoder on the static buffers
        def __init__(self, enc, key, inputs, mu):
            self.enc, self.key, self.inputs, self.mu = enc, key, inputs, mu

        def replay(self):
            ids, n, lens, streaming = self.inputs
            self.mu.copy_(RowEncoder.__call__(self.enc, ids, n, lens, self.key[1], streaming))

    class PaddedEagerEncoder(GraphEncoder):   # GraphEncoder's buckets and buffers, eager execution
        def capture(self, key, device):
            inputs = self.buffers(key, device)
            mu = RowEncoder.__call__(self, *inputs[:3], key[1], inputs[3])
            self.graphs[key] = (EagerReplay(self, key, inputs, mu), inputs, mu)
            return self.graphs[key]

    padded = BatchedFlow(flow, PaddedEager(flow.decoder, None, max_batch_size=8, frame_bucket=64))
    padded.solver.step = padded.estimator
    padded.encoder = PaddedEagerEncoder(flow, max_batch_size=8, frame_bucket=64)
    assert padded.solver.bucket(3, 130) == (4, 192)
    assert padded.encoder.bucket(3, 65) == (4, 96)   # tokens to a multiple of 64 frames / 2
    exact = BatchedFlow(flow)
    for a, b in zip(exact(rows), padded(rows)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=1e-4)
    assert list(padded.encoder.graphs) == [(4, 96)]   # the padded encoder path ran


def test_hift_bucket_padding_is_invisible(model):
    """GraphHift pads rows to a power of two and mel frames to HIFT_FRAME_BUCKET and always runs the
    masked network: same audio and excitation as BatchedHift (run eagerly here)."""
    from light_tts.server.decode.batched_hift import BatchedHift
    from light_tts.server.decode.cuda_graph import HIFT_FRAME_BUCKET, GraphHift

    class EagerReplay:   # stands in for a captured graph: the masked network on the static buffers
        def __init__(self, hift, inputs, wav):
            self.hift, self.inputs, self.wav = hift, inputs, wav

        def replay(self):
            self.wav.copy_(self.hift.masked(*self.inputs))

    class PaddedEagerHift(GraphHift):
        def capture(self, key, like):
            inputs = self.buffers(key, like)
            wav = self.masked(*inputs)
            self.graphs[key] = (EagerReplay(self, inputs, wav), inputs, wav)
            return self.graphs[key]

    _, hift, _ = model
    g = torch.Generator().manual_seed(5)
    exact, padded = BatchedHift(hift), PaddedEagerHift(hift, max_batch_size=8)
    for frames in ([58, 58, 58], [58, 41, 23]):        # equal lengths (HiFT's own decode in exact), unequal
        mels = [torch.randn(1, 80, n, generator=g) for n in frames]
        caches = [None, torch.randn(1, 1, 480 * 4, generator=g) * 0.1, None]
        want = exact(mels, caches, [torch.Generator().manual_seed(i) for i in range(3)])
        got = padded(mels, caches, [torch.Generator().manual_seed(i) for i in range(3)])
        for (a, sa), (b, sb) in zip(want, got):
            assert a.shape == b.shape and sa.shape == sb.shape
            torch.testing.assert_close(sb, sa, rtol=0, atol=0)          # the excitation stays per request
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=2e-4)
    bucket = -(-58 // HIFT_FRAME_BUCKET) * HIFT_FRAME_BUCKET
    assert list(padded.graphs) == [(4, bucket)]   # the padded path ran (both calls, one bucket)


def test_a_failed_graph_capture_falls_back_to_eager_but_out_of_memory_surfaces(model):
    from light_tts.server.decode.batched_hift import BatchedHift
    from light_tts.server.decode.cuda_graph import GraphHift

    class Failing(GraphHift):
        error = RuntimeError("capture not supported here")

        def capture(self, key, like):
            raise self.error

    _, hift, _ = model
    mels = [torch.randn(1, 80, 58, generator=torch.Generator().manual_seed(9))]
    want = BatchedHift(hift)(mels, [None], [torch.Generator().manual_seed(0)])
    failing = Failing(hift, max_batch_size=4)
    got = failing(mels, [None], [torch.Generator().manual_seed(0)])   # eager, same audio
    assert failing.failed and failing.bucket(1, 58) is None
    torch.testing.assert_close(got[0][0], want[0][0])
    oom = Failing(hift, max_batch_size=4)
    oom.error = torch.cuda.OutOfMemoryError("out of memory")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        oom(mels, [None], [torch.Generator().manual_seed(0)])


def test_one_row_is_bit_exact_with_the_plain_path(family_model):
    model = family_model
    flow, hift, _ = model
    req = _requests(flow, [(21, 60, 3)])[0]
    ref = list(stream_chunks(iter(req[3]), _t2w(model, req), stream=True))
    d = StreamingDecoder(_t2w(model, req), stream=True)
    d.feed(req[3])
    d.end()
    got, _ = _run_batched(DecodeEngine(flow, hift), [d])
    assert all(np.array_equal(a, b) for a, b in zip(ref, got[0])) and len(ref) == len(got[0])


def test_smaller_first_hop_realigns_with_the_official_schedule(model):
    flow, hift, sch = model
    hops = lambda s, tp: [h for h, _ in zip(s.hops(tp), range(5))]
    assert hops(sch, 30) == [45, 50, 100, 100, 100]
    small = StreamSchedule(pre_lookahead_len=sch.pre_lookahead_len, first_hop_len=10)
    assert hops(small, 30) == [10, 35, 50, 100, 100]    # back on the official chunk boundaries after 2 hops
    assert hops(small, 50)[:2] == [10, 15]
    assert hops(StreamSchedule(first_hop_len=60), 30)[0] == 45   # not smaller: the official hop
    req = _requests(flow, [(30, 80, 0)])[0]
    official = list(stream_chunks(iter(req[3]), _t2w(model, req), stream=True))
    early = list(stream_chunks(iter(req[3]), _t2w(model, req, small), stream=True))
    # first audio after 10 + 3 tokens instead of 45 + 3; same total length, one chunk more
    assert len(early[0]) == (2 * 10 - sch.mel_cache_len) * 480 and len(early) == len(official) + 1
    assert sum(map(len, early)) == sum(map(len, official))


def test_onnx_export_matches_pytorch(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from light_tts.server.decode.onnx_export import INPUT_NAMES, example_inputs, export_estimator
    flow, _, _ = model
    est = BiasEstimator(flow.decoder.estimator).eval()
    path = export_estimator(est, str(tmp_path / "estimator.onnx"))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # other batch and frames than the export's example; padded rows; both mask kinds; an empty row
    args = example_inputs(est, batch=5, frames=173, lengths=[173, 150, 99, 1, 0],
                          streaming=[True, False, True, False, True], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = est(*args).numpy()
    out = sess.run(None, {n: a.numpy() for n, a in zip(INPUT_NAMES, args)})[0]
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # and the bias form equals the model's own estimator with its streaming flag
    with torch.no_grad():
        own = flow.decoder.estimator(*(a[:1] for a in args[:6]), streaming=True)
    np.testing.assert_allclose(own.numpy(), ref[:1], rtol=0, atol=1e-4 * np.abs(ref).max())


def test_decode_worker_gpu_assignment():
    assert [decode_device(i, 2) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert decode_device(3, 1) == "cuda:0" and decode_device(0, 0) == "cpu" and decode_device(7, 0) == "cpu"
    assert [decode_device(i, 3) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    with pytest.raises(ValueError):
        decode_device(-1, 2)
    # CUDA_VISIBLE_DEVICES: torch's cuda:i is the i-th listed card
    assert visible_gpus(None, 2) == ["0", "1"]
    assert visible_gpus("2,3", 2) == ["2", "3"]
    assert [physical_gpu(i, "3,1", 2) for i in range(3)] == ["3", "1", "3"]
    assert visible_gpus("1,-1,0", 1) == ["1"]            # CUDA stops at the first invalid entry
    assert visible_gpus("", 0) == [] and visible_gpus("-1", 0) == []
    assert physical_gpu(0, "-1", 0) is None
    assert visible_gpus("GPU-8a1b2c3d-0000-1111-2222-333344445555,1", 2)[0].startswith("GPU-")


@pytest.mark.server
def test_load_trt_without_tensorrt_or_gpu_fails_at_start_with_what_to_change(tiny_model_dir, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from server_util import Server
    server = Server.api_server(tiny_model_dir, tmp_path, "--load_trt")
    try:
        rc = server.proc.wait(timeout=180)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    log = open(server.log_path).read()
    # refused before any stage loads (it used to fail in the decode stage, 7-15 s later), with what
    # to change: no GPU here, or no tensorrt package (tests/test_server_args.py covers both lines)
    assert rc == 2, log
    assert "--load_trt True needs" in log and "--load_trt False" in log, log
    assert "stage decode:0" not in log and "starting" not in log, log
