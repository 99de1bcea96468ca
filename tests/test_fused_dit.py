"""CosyVoice3's fused DiT step (light_tts.server.decode.fused_dit) against the plain DiT.

- FusedDiT equals DiTBiasEstimator (DiT.forward_masked with the dense bias) on the same weights and
  inputs, fp32: a padded batch with streaming and full-attention rows and an empty padding row,
  through the reference kernels and through the Triton ones (interpreted on the CPU). Every weight
  is re-drawn, so a weight taken from the wrong module changes the output.
- A row that continues a recorded prefix (a voice's frames, then a stream's) equals the same frames
  computed in one pass: the rotary positions start after the prefix and the position convs start
  from the recorded context. The comparison is sharp: positions from 0, or the context left out,
  move the output well past the tolerance.
"""
import pytest
import torch

from light_tts.kernels import dispatch
from light_tts.models.flow.dit import DiT
from light_tts.models.flow.masks import valid_mask
from light_tts.server.decode.batched_flow import DiTBiasEstimator, FrameAttention, attention_bias
from light_tts.server.decode.fused_dit import FusedDiT
from light_tts.server.decode.prompt_cache import PromptCache, Recorder, RowPrefix, Target

CHUNK = 32   # frames per attention chunk (the real one is 50; at least the position convs' 30)
TOL = dict(rtol=1e-5, atol=1e-5)


def _dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(dim=32, depth=2, heads=2, dim_head=16, mel_dim=80, mu_dim=80, spk_dim=80, out_channels=80,
              static_chunk_size=CHUNK).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
    return dit


def _attention(lengths, streaming, **prefix) -> FrameAttention:
    rows = lambda v: torch.tensor(v, dtype=torch.int32)
    zeros = rows([0] * len(lengths))
    kw = dict(prefix_start=zeros, prefix_len=zeros, stream_start=zeros, stream_len=zeros)
    kw.update({k: rows(v) for k, v in prefix.items() if k in kw})
    rest = {k: v for k, v in prefix.items() if k not in kw}
    return FrameAttention(rows(lengths), rows(streaming), **kw, branch_rows=len(lengths), **rest)




@torch.inference_mode()
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_dit_equals_the_plain_dit(backend):
    """Rows of 100 (streaming), 70 (full attention), 45 (streaming) and 0 (padding) frames."""
    dit = _dit()
    plain = DiTBiasEstimator(dit)
    fused = FusedDiT(dit)
    lengths, streaming, frames = [100, 70, 45, 0], [1, 0, 1, 0], 100
    g = torch.Generator().manual_seed(1)
    mask = valid_mask(torch.tensor(lengths), frames)
    mf = mask.float()
    x, mu, cond = (torch.randn(4, 80, frames, generator=g) * mf for _ in range(3))
    t, spks = torch.rand(4, generator=g), torch.randn(4, 80, generator=g)
    bias = attention_bias(mask, torch.tensor(streaming).bool(), CHUNK, torch.float32)
    want = plain(x, mf, mu, t, spks, cond, bias)
    with dispatch.using(backend):
        got = fused(x, mf, mu, t, spks, cond, _attention(lengths, streaming))
    assert float(want[:3].abs().max()) > 0.1
    for r, n in enumerate(lengths):
        torch.testing.assert_close(got[r, :, :n], want[r, :, :n], **TOL)


@torch.inference_mode()
def test_a_row_continues_a_recorded_prefix():
    """Record frames [0, 64) as a voice, compute [64, 100) from it while recording its whole chunk
    [64, 96) as a stream, then [96, 100) from both: each equals the whole 100 frames computed at
    once. Two rows: the CFG layout (branch_rows = 1) with its unconditional half."""
    dit = _dit(seed=3)
    fused = FusedDiT(dit)
    cache = PromptCache(fused, 1, 200, 2, 3, CHUNK // 2, "cpu", torch.float32)
    g = torch.Generator().manual_seed(2)
    x, mu, cond = (torch.randn(2, 80, 100, generator=g) for _ in range(3))
    t, spks = torch.rand(2, generator=g), torch.randn(2, 80, generator=g)

    def run(lo, hi, **prefix):
        fa = _attention([hi - lo] * 2, [1, 1], **prefix)
        fa.branch_rows = 1
        return fused(x[:, :, lo:hi], torch.ones(2, 1, hi - lo), mu[:, :, lo:hi], t, spks, cond[:, :, lo:hi], fa)

    whole = run(0, 100)
    voice = cache._allocate(b"voice", 64, set())
    voice.start = 7   # not at slot 0
    record = Recorder.for_targets(cache, [Target(0, voice, 0, 64)], 1, 64)
    run(0, 64, record=record)
    record.finish()
    prefix = RowPrefix(voice=voice)
    stream = cache._new_entry(100, 0, 32, base=64)
    at_voice = dict(prefix_start=[7, 7], prefix_len=[64, 64])
    record = Recorder.for_targets(cache, [Target(0, stream, 0, 32)], 1, 36)
    rest = run(64, 100, **at_voice, cache=cache, ctx=cache.context([prefix], 1).flatten(0, 1), record=record)
    record.finish()
    assert float(whole.abs().max()) > 0.1
    torch.testing.assert_close(rest, whole[:, :, 64:], **TOL)
    assert stream.frames == 32
    prefix.stream = stream
    both = dict(at_voice, stream_start=[100, 100], stream_len=[32, 32], cache=cache,
                ctx=cache.context([prefix], 1).flatten(0, 1))
    torch.testing.assert_close(run(96, 100, **both), whole[:, :, 96:], **TOL)

    # the comparison is sharp: rotary positions from 0, or no conv context, are far off
    far = lambda got: float((got - whole[:, :, 96:]).abs().max()) > 100 * TOL["atol"]
    real_rope = fused._rope
    fused._rope = lambda attn, n, dev: real_rope(_attention([n] * 2, [1, 1]), n, dev)
    try:
        assert far(run(96, 100, **both))
    finally:
        fused._rope = real_rope
    assert far(run(96, 100, **dict(both, ctx=None)))


def test_the_position_convs_must_fit_in_a_chunk():
    with pytest.raises(ValueError, match="exceeds the 16-frame chunk"):
        FusedDiT(DiT(dim=32, depth=1, heads=2, dim_head=16, mel_dim=80, spk_dim=80, static_chunk_size=16))
