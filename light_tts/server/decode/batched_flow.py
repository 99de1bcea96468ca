"""One flow call for the chunks of many requests.

Both families: CosyVoice2's conformer flow with its U-Net estimator, and CosyVoice3's DiT flow
(its encoder is the pre-lookahead layer; its estimator takes the same dense bias: DiTBiasEstimator).
Each family has its fused step that takes a FrameAttention instead (fused_estimator.py, fused_dit.py),
and the prompt cache below serves both.

The encoder runs once for all rows (lengths differ; each row's look-ahead tokens follow its own
tokens: the flow's encode_rows) -> mu, plus each row's prompt condition. Every row
is padded on the right to one T and the 10 Euler steps with classifier-free guidance run as ONE
estimator call per step over the doubled batch [conditional rows; unconditional rows].

Why padding is invisible to the real frames: the estimator's convolutions are causal (left
padding only), every block multiplies by the frame mask before its convolutions, and attention
takes an additive bias that hides padded keys (`attention_bias`). So frame j < T_i of row i sees
exactly what it sees alone. The bias also carries each row's own mask kind: streaming chunks use
the chunk-causal mask (static_chunk_size frames), final chunks the full mask, so both kinds share
a batch. Padded rows (batch buckets) have an empty frame mask; `attention_mask` opens their
attention fully so nothing divides by zero, and their output is discarded.

`BiasEstimator` is the estimator's forward with that bias as an explicit input: one function for
eager, torch.compile, CUDA graphs and the ONNX/TensorRT export. On a GPU the default step is the
fused estimator (fused_estimator.py), which takes the same rule as a `FrameAttention` (lengths and
streaming flags, no (B, 1, T, T) tensor) and can continue a cached prefix: with a prompt cache
(prompt_cache.py) a streaming row computes only the frames after its voice's cached prompt
frames and its own stream's earlier frames, which no later token changes, and keeps the frames of
its chunk that are final for the next one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from light_tts.models.flow.cfm import NOISE_FRAMES, CausalConditionalCFM
from light_tts.models.flow.masks import mask_to_bias, row_attention_mask, valid_mask
from light_tts.models.flow.unet_blocks import CausalConv1d, sinusoidal_time_embedding


def check_single_resolution(estimator: nn.Module, what: str) -> None:
    """The batched paths rewrite the U-Net forward for CosyVoice2's single resolution (channels: [C])."""
    if len(estimator.down_blocks) != 1 or not isinstance(estimator.down_blocks[0].resample, CausalConv1d):
        raise ValueError(f"{what} supports the single-resolution estimator (channels: [C]) only")


class BiasEstimator(nn.Module):
    """CausalConditionalDecoder.forward with the attention bias as input (B, 1, T, T) instead of
    the `streaming` flag. Single-resolution U-Nets only (CosyVoice2: channels [256])."""

    def __init__(self, estimator: nn.Module):
        super().__init__()
        check_single_resolution(estimator, "batched decode")
        self.estimator = estimator

    def _attend(self, stage, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2).contiguous()
        for block in stage.transformers:
            h = block(h, bias)
        return h.transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T); t (B,); spks (B, 80); attn_bias (B, 1, T, T)."""
        est = self.estimator
        t_emb = est.time_mlp(sinusoidal_time_embedding(t, est.in_channels))
        x = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.size(-1)), cond], dim=1)
        skips = []
        for stage in est.down_blocks:
            x = self._attend(stage, stage.resnet(x, mask, t_emb), attn_bias)
            skips.append(x)
            x = stage.resample(x * mask)
        for stage in est.mid_blocks:
            x = self._attend(stage, stage.resnet(x, mask, t_emb), attn_bias)
        for stage in est.up_blocks:
            skip = skips.pop()
            x = torch.cat([x[:, :, :skip.size(-1)], skip], dim=1)
            x = self._attend(stage, stage.resnet(x, mask, t_emb), attn_bias)
            x = stage.resample(x * mask)
        x = est.final_block(x, mask)
        return est.final_proj(x * mask) * mask


class DiTBiasEstimator(nn.Module):
    """CosyVoice3's DiT with the attention bias as input (B, 1, T, T) instead of the `streaming`
    flag: the same call as BiasEstimator. Padding is invisible to the real frames as in the U-Net:
    the DiT's position convs are causal, padded keys are hidden and padded frames zeroed after
    each attention (light_tts.models.flow.dit)."""

    def __init__(self, estimator: nn.Module):
        super().__init__()
        self.estimator = estimator

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        return self.estimator.forward_masked(x, mask, mu, t, spks, cond, attn_bias)


def bias_estimator(estimator: nn.Module) -> nn.Module:
    """The dense-bias estimator of this flow's family: the U-Net's (CosyVoice2) or the DiT's (CosyVoice3)."""
    from light_tts.models.flow.dit import DiT
    return DiTBiasEstimator(estimator) if isinstance(estimator, DiT) else BiasEstimator(estimator)


def attention_bias(frame_mask: torch.Tensor, streaming: torch.Tensor, chunk_frames: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T) bool frame mask, (B,) bool streaming -> additive bias (B, 1, T, T): per row the
    chunk-causal mask (streaming) or the plain key mask, as the estimator builds for one request."""
    return mask_to_bias(row_attention_mask(frame_mask, chunk_frames, streaming), dtype).unsqueeze(1)


@dataclass
class FrameAttention:
    """The fused estimator's attention input at one Euler step, instead of a dense bias: per row of
    the CFG-doubled batch the frames it computes, whether its mask is chunk-causal, and the cached
    prefix those frames continue (prompt_cache.py; kernels/flow_attention.py says the rule)."""
    lengths: torch.Tensor        # (B,) int32 frames computed
    streaming: torch.Tensor      # (B,) int32 1: chunk-causal mask
    prefix_start: torch.Tensor   # (B,) int32 first pool slot of the row's cached voice frames
    prefix_len: torch.Tensor     # (B,) int32 cached voice frames (0: none)
    stream_start: torch.Tensor   # (B,) int32 first pool slot of the row's cached stream frames
    stream_len: torch.Tensor     # (B,) int32 cached stream frames, after the voice's (0: none)
    branch_rows: int             # rows per CFG branch: row r reads the pool's branch r // branch_rows
    step: int = 0                # Euler step: which slice of the pool and of ctx
    ctx: Optional[torch.Tensor] = None   # (B, steps, ctx_size) the causal convs' inputs just before
    #                                      the first computed frame (None: zeros, as with no prefix)
    cache: Optional[object] = None       # prompt_cache.PromptCache holding the prefixes
    record: Optional[object] = None      # prompt_cache.Recorder: keep these rows' keys/values/context


class FrameStep(nn.Module):
    """What the fused estimator steps share (fused_estimator.FusedEstimator, fused_dit.FusedDiT):
    they take a FrameAttention, and read a layer's cached keys and values from the prompt cache's
    pool. A subclass sets `heads` and `head_dim`."""

    frame_attention = True   # BatchedFlow: hand it a FrameAttention, not a dense bias
    heads: int
    head_dim: int

    def __init__(self):
        super().__init__()
        self._no_pool: dict = {}   # (device, dtype) -> the 1-slot dummy pool

    def _pools(self, attn: FrameAttention, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache's key and value pools of this step and layer, [slots, 2, H, D] (a 1-slot dummy
        without a cache: every prefix is empty then)."""
        if attn.cache is not None:
            return attn.cache.pools(attn.step, layer)
        key = (like.device, like.dtype)
        if key not in self._no_pool:
            self._no_pool[key] = torch.zeros(1, 2, self.heads, self.head_dim, device=like.device, dtype=like.dtype)
        return self._no_pool[key], self._no_pool[key]


@dataclass
class FlowBatch:
    """Padded estimator inputs (B rows, maybe more after bucketing) and what to cut out after. The
    frames are those computed: a row with a cached prefix starts after it."""
    mu: torch.Tensor            # (B, 80, T)
    mask: torch.Tensor          # (B, 1, T) in the estimator dtype
    spks: torch.Tensor          # (B, 80)
    cond: torch.Tensor          # (B, 80, T)
    lengths: torch.Tensor       # (B,) int32 frames computed per row
    streaming: torch.Tensor     # (B,) int32
    prefix_start: torch.Tensor  # (B,) int32
    prefix_len: torch.Tensor    # (B,) int32
    stream_start: torch.Tensor  # (B,) int32
    stream_len: torch.Tensor    # (B,) int32
    ctx: Optional[torch.Tensor] = None    # (2, B, steps, ctx_size): per CFG branch (prompt cache on)
    bias: Optional[torch.Tensor] = None   # (B, 1, T, T): estimators that take a dense bias
    cache: Optional[object] = None
    frames: Sequence[int] = ()          # real frames per row, prefix included
    prompt_frames: Sequence[int] = ()
    prefixes: Sequence = ()             # per row its prompt_cache.RowPrefix or None
    skipped: Sequence[int] = ()         # cached frames per row (not computed), as the pass began

    TENSORS = ("mu", "mask", "spks", "cond", "lengths", "streaming", "prefix_start", "prefix_len", "stream_start",
               "stream_len", "ctx", "bias")


def euler_cfg(step: Callable, x: torch.Tensor, batch: FlowBatch, t_span: torch.Tensor, cfg_rate: float,
              record=None) -> torch.Tensor:
    """CausalConditionalCFM.solve_euler for a padded batch, one `step` (estimator) call per Euler
    step over the doubled batch [conditional rows; unconditional rows]. Same arithmetic, in the
    same order, as the official loop."""
    b = x.size(0)
    dtype = batch.spks.dtype
    two = lambda t: torch.cat([t, t], dim=0)
    mask_in = two(batch.mask).to(dtype)
    mu_in = torch.cat([batch.mu, torch.zeros_like(batch.mu)], dim=0).to(dtype)
    spks_in = torch.cat([batch.spks, torch.zeros_like(batch.spks)], dim=0).to(dtype)
    cond_in = torch.cat([batch.cond, torch.zeros_like(batch.cond)], dim=0).to(dtype)
    if batch.bias is not None:
        bias_in = two(batch.bias)
        attention = lambda i: bias_in
    else:
        rows = [two(t) for t in (batch.lengths, batch.streaming, batch.prefix_start, batch.prefix_len,
                                 batch.stream_start, batch.stream_len)]
        ctx = None if batch.ctx is None else batch.ctx.flatten(0, 1)   # the doubled batch's rows
        attention = lambda i: FrameAttention(*rows, branch_rows=b, step=i, ctx=ctx, cache=batch.cache, record=record)
    w = cfg_rate
    t, dt = t_span[0].unsqueeze(0), t_span[1] - t_span[0]
    n = len(t_span)
    for i in range(1, n):
        x_in = torch.cat([x, x], dim=0).to(dtype)
        t_in = t.to(dtype).expand(2 * b)
        v = step(x_in, mask_in, mu_in, t_in, spks_in, cond_in, attention(i - 1))
        x = x + dt * ((1.0 + w) * v[:b] - w * v[b:])
        t = t + dt
        if i < n - 1:
            dt = t_span[i + 1] - t
    return x.float()


# What one more solver call costs, in row x frame units of estimator work: on an H200 a call is
# ~27 ms of fixed cost (the launches of 10 Euler steps) and ~0.015 ms per padded row-frame
# (docs/benchmarks.md). A smaller value splits more often.
SPLIT_COST_ROW_FRAMES = 2000


def split_by_frames(frames: Sequence[int], bucket: Callable[[int, int], tuple[int, int]],
                    call_cost: int = SPLIT_COST_ROW_FRAMES) -> list[list[int]]:
    """Rows (their computed frames) -> groups of row indices, one solver call each. A call costs
    what its padded (bucketed) rows x frames cost, so one long row (a stream's final chunk) in a
    batch of short ones (first chunks after a cached prompt) makes them all long. Sorted by
    frames, the rows are cut where the padding saved is worth more than another call (dynamic
    programming over the cut points)."""
    order = sorted(range(len(frames)), key=lambda i: frames[i])
    n = len(order)
    best = [0] + [None] * n        # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            b, t = bucket(j - i, frames[order[j - 1]])
            cost = best[i] + call_cost + b * t
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


class EagerSolver:
    """Runs euler_cfg on exactly the batch it gets (no buckets)."""

    def __init__(self, cfm: CausalConditionalCFM, step: Callable, n_timesteps: int):
        self.cfm, self.step, self.n_timesteps = cfm, step, n_timesteps
        self._noise: dict = {}

    def bucket(self, rows: int, frames: int) -> tuple[int, int]:
        return rows, frames

    def noise(self, frames: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The official start noise's first `frames` columns, kept on the device (no host copy
        per call, so the loop can be captured in a CUDA graph)."""
        key = (str(device), dtype)
        if key not in self._noise:
            self._noise[key] = self.cfm.initial_noise(NOISE_FRAMES, device, dtype)
        return self._noise[key][:, :, :frames]

    def run(self, batch: FlowBatch, record=None) -> torch.Tensor:
        """The Euler loop on this batch as it is (eager). Row r starts from the official noise at
        its own frames: columns prefix_len[r] + stream_len[r] ... (a cached prefix took the ones before)."""
        mu = batch.mu
        t = mu.size(2)
        noise = self.noise(NOISE_FRAMES, mu.device, mu.dtype)[0]              # (80, NOISE_FRAMES)
        first = (batch.prefix_len + batch.stream_len).long().unsqueeze(1)
        cols = (first + torch.arange(t, device=mu.device)).clamp_(max=NOISE_FRAMES - 1)
        x0 = noise[:, cols].transpose(0, 1)                                     # (B, 80, T)
        t_span = self.cfm.time_grid(self.n_timesteps, mu.device, mu.dtype)
        return euler_cfg(self.step, x0, batch, t_span, self.cfm.inference_cfg_rate, record)

    def __call__(self, batch: FlowBatch) -> torch.Tensor:
        return self.run(batch)

    def run_recording(self, batch: FlowBatch, record) -> torch.Tensor:
        """A pass that keeps keys/values and conv context in the prompt cache (prompt_cache.Recorder
        says what): a voice's fill, or the chunks of streams."""
        return self.run(batch, record)


class RowEncoder:
    """The flow's token encoder for a batch of rows: (ids (B, W) with -1 past each row's tokens,
    n (B,) tokens per row incl. look-ahead, lens (B,) tokens that yield frames, t = max(lens),
    streaming (B,) bool) -> mu (B, 80, stride * t), zero past each row's frames.
    Rows with n = lens = 0 are padding (all masked; cuda_graph.GraphEncoder adds them)."""

    def __init__(self, flow: nn.Module):
        self.flow = flow

    def __call__(self, ids: torch.Tensor, n: torch.Tensor, lens: torch.Tensor, t: int,
                 streaming: torch.Tensor) -> torch.Tensor:
        return self.flow.encode_rows(ids, n, lens, t, streaming)


class BatchedFlow:
    """rows of (Token2Wav, Chunk) -> one mel (1, 80, new frames) float32 per row, as
    Token2Wav's flow.inference call gives it."""

    def __init__(self, flow: nn.Module, solver=None, n_timesteps: int = 10):
        self.flow = flow
        self.estimator = bias_estimator(flow.decoder.estimator)
        self.chunk_frames = int(flow.decoder.estimator.static_chunk_size)
        self.solver = solver or EagerSolver(flow.decoder, self.estimator, n_timesteps)
        self.encoder = RowEncoder(flow)   # build_engine swaps in cuda_graph.GraphEncoder on CUDA
        self.prompt_cache = None          # prompt_cache.PromptCache (fused estimator only; build_engine)
        self.split_cost = SPLIT_COST_ROW_FRAMES

    @property
    def dtype(self) -> torch.dtype:
        return self.flow.dtype

    def encode(self, seqs: Sequence[torch.Tensor], lens: Sequence[int], streaming: Sequence[bool]) -> torch.Tensor:
        """One encoder call for token rows `seqs` (look-ahead tokens inline after the lens[i] that
        yield frames) -> mu (B, 80, ratio * max(lens)), zero past each row's frames."""
        flow, dev = self.flow, seqs[0].device
        ids = nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=-1)
        t = max(lens)
        mu = self.encoder(ids, torch.tensor([s.numel() for s in seqs], device=dev), torch.tensor(list(lens), device=dev),
                          t, torch.tensor(list(streaming), device=dev))
        return mu[:len(seqs), :, :t * flow.token_mel_ratio]

    def encode_rows(self, rows: Sequence) -> tuple[torch.Tensor, list[int]]:
        """(mu (B, 80, T) with zeros past each row's frames, frames per row): one encoder call for
        every row (prompt + chunk tokens; the look-ahead tokens of a streaming chunk inline after
        its tokens), equal per row to flow.inference's encoding of that request alone."""
        flow, dev = self.flow, rows[0][0].device
        k = flow.pre_lookahead_len
        seqs = [torch.cat([t2w.prompt_tokens[0], chunk.tokens.reshape(-1).to(dev, torch.int32)]) for t2w, chunk in rows]
        lens = [s.numel() if chunk.finalize else s.numel() - k for s, (_, chunk) in zip(seqs, rows)]
        mu = self.encode(seqs, lens, [chunk.streaming for _, chunk in rows])
        return mu, [m * flow.token_mel_ratio for m in lens]

    @property
    def frame_attention(self) -> bool:
        """Whether the solver's estimator takes a FrameAttention (the fused one) or a dense bias."""
        return bool(getattr(self.solver.step, "frame_attention", False))

    def make_batch(self, mu_rows: Sequence[torch.Tensor], feats: Sequence[torch.Tensor], emb: torch.Tensor,
                   streaming: Sequence[bool], prefixes: Sequence) -> FlowBatch:
        """The padded FlowBatch of rows given as their computed frames: mu_rows[i] (80, n_i), the
        prompt condition feats[i] (frames, 80) counted from the row's first computed frame, the
        speaker embeddings (B, 192), and per row its cached prefix (prompt_cache.RowPrefix) or None."""
        rows = len(mu_rows)
        n = [m.size(1) for m in mu_rows]
        b, t = self.solver.bucket(rows, max(n))
        dev, dtype = mu_rows[0].device, mu_rows[0].dtype
        mu = torch.zeros(b, mu_rows[0].size(0), t, device=dev, dtype=dtype)
        cond = torch.zeros_like(mu)
        for i, (m, feat) in enumerate(zip(mu_rows, feats)):
            mu[i, :, :m.size(1)] = m
            cond[i, :, :feat.size(0)] = feat.transpose(0, 1).to(dtype)
        spks = torch.zeros(b, mu.size(1), device=dev, dtype=dtype)
        spks[:rows] = self.flow.speaker(emb)
        pad = [0] * (b - rows)
        as_tensor = lambda v: torch.tensor(list(v) + pad, device=dev, dtype=torch.int32)
        lengths, stream = as_tensor(n), as_tensor(int(x) for x in streaming)
        frame_mask = valid_mask(lengths, t)
        cache = self.prompt_cache
        voice = [p.voice if p is not None else None for p in prefixes]
        own = [p.stream if p is not None else None for p in prefixes]
        batch = FlowBatch(mu=mu, mask=frame_mask.to(dtype), spks=spks, cond=cond, lengths=lengths, streaming=stream,
                          prefix_start=as_tensor(e.start if e else 0 for e in voice),
                          prefix_len=as_tensor(e.frames if e else 0 for e in voice),
                          stream_start=as_tensor(e.start if e else 0 for e in own),
                          stream_len=as_tensor(e.frames if e else 0 for e in own), cache=cache,
                          prefixes=list(prefixes), skipped=[p.frames if p is not None else 0 for p in prefixes])
        if cache is not None:
            batch.ctx = cache.context(prefixes, b)
        if not self.frame_attention:
            batch.bias = attention_bias(frame_mask, stream.bool(), self.chunk_frames, dtype)
        return batch

    def prepare(self, rows: Sequence) -> list[tuple[list[int], FlowBatch]]:
        """The rows' solver batches: one encoder call for all, then groups of similar length
        (`split_by_frames`), each a padded FlowBatch with the indices of its rows."""
        enc, frames = self.encode_rows(rows)
        cache = self.prompt_cache
        prefixes = cache.prefixes(self, rows) if cache is not None else [None] * len(rows)
        skip = [p.frames if p is not None else 0 for p in prefixes]
        out = []
        for group in split_by_frames([f - s for f, s in zip(frames, skip)], self.solver.bucket, self.split_cost):
            sub = [rows[i] for i in group]
            emb = torch.cat([t2w.embedding for t2w, _ in sub], dim=0)
            batch = self.make_batch([enc[i, :, skip[i]:frames[i]] for i in group],
                                    [rows[i][0].prompt_feat[0, skip[i]:] for i in group], emb,
                                    [c.streaming for _, c in sub], [prefixes[i] for i in group])
            batch.frames = [frames[i] for i in group]
            batch.prompt_frames = [t2w.prompt_feat.size(1) for t2w, _ in sub]
            out.append((group, batch))
        return out

    @torch.inference_mode()
    def __call__(self, rows: Sequence) -> list:
        """Per row the mel, or the exception that failed that row alone (e.g. a bad token id in
        its encoder); the others still run together."""
        out: list = [None] * len(rows)
        good = []
        for i, (t2w, chunk) in enumerate(rows):
            try:
                self.check_row(t2w, chunk)
                good.append(i)
            except Exception as e:
                out[i] = e
        if good:
            for group, batch in self.prepare([rows[i] for i in good]):
                record = self.prompt_cache.recorder(batch.prefixes, batch.mu.size(0), batch.mu.size(2)) \
                    if self.prompt_cache is not None else None
                if record is None:
                    mel = self.solver(batch)
                else:   # streaming rows keep their final frames for their next chunk
                    mel = self.solver.run_recording(batch, record)
                    record.finish()
                for j, g in enumerate(group):
                    out[good[g]] = self._generated_mel(mel[j:j + 1], batch, j, rows[good[g]][1])
        return out

    def _generated_mel(self, mel: torch.Tensor, batch: FlowBatch, j: int, chunk) -> torch.Tensor:
        """Row j's mel over the generated frames (1, 80, frames - prompt), as flow.inference gives
        it. Generated frames its stream had cached were not computed: zeros stand in for them, and
        the chunk's audio starts after them (a stream caches only frames of earlier chunks)."""
        skip, prompt = batch.skipped[j], batch.prompt_frames[j]
        out = mel[:, :, max(prompt - skip, 0):batch.frames[j] - skip]
        lead = max(skip - prompt, 0)
        if lead:
            if chunk.offset * self.flow.token_mel_ratio < lead:
                raise RuntimeError(f"flow: the stream cache holds {lead} generated frames but the chunk "
                                   f"starts at frame {chunk.offset * self.flow.token_mel_ratio}")
            out = torch.cat([out.new_zeros(1, out.size(1), lead), out], dim=2)
        return out

    def check_row(self, t2w, chunk) -> None:
        """What would fail this row's encoder, found before the batch runs."""
        tokens = chunk.tokens
        if tokens.numel() == 0 or (not chunk.finalize and tokens.numel() <= self.flow.pre_lookahead_len):
            raise ValueError(f"flow: too few tokens ({tokens.numel()}) for a chunk")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.flow.vocab_size:
            raise ValueError(f"speech token {hi if hi >= self.flow.vocab_size else lo} outside the "
                             f"{self.flow.vocab_size}-token vocabulary")
