"""FusedEstimator: BiasEstimator's forward (same weights, same inputs, same math up to rounding) in
about 60% of the kernels (753 instead of 1224 per call), because at small batches the estimator is launch bound: ~1200 kernels of a few
microseconds per Euler step (docs/benchmarks.md, scripts/bench/profile_flow.py).

What changes against the module-by-module forward:
- the transformer blocks keep their rows as (B, T, C) for the whole stage (no transposes around
  each stage), q/k/v are one GEMM, and the output/FFN projections run without their bias: the
  bias, the residual add and the next LayerNorm are one `frame_norm` kernel;
- a resnet block is two convolutions plus one `frame_norm` each (LayerNorm over channels read
  straight from the (B, C, T) conv output, Mish, the masks, the time embedding or the residual
  conv added), and the residual 1x1 conv; the causal left padding is the conv's own padding with
  the two extra output frames dropped;
- the time embedding's per-resnet projections (Mish then Linear, 14 of them) are one GEMM;
- attention is kernels/flow_attention.py: the chunk mask is a rule (a `FrameAttention` of lengths
  and streaming flags, not a (B, 1, T, T) bias), and a row may continue a cached prefix: its
  keys/values come from the prompt cache's pool and its causal convolutions start from the cached
  context instead of zeros (prompt_cache.py). With a `record`, the rows' keys/values and context
  are stored into the cache instead.
Every consumer of a stage's output multiplies it by the frame mask first (resnets, resample
convs, the final block), so stages hand over masked tensors and the separate mask products go.

The fused q/k/v and time weights are made at construction and the modules' own parameters become
views of them (models/fusion.py): build this after the weights are loaded and cast (build_engine
does). Rounding differs from the plain forward (one rounding per
fused op instead of one per op), so the two agree to the dtype's tolerance, exactly in fp32 up to
summation order (tests/test_fused_estimator.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from light_tts.server.decode.batched_flow import FrameAttention, FrameStep, check_single_resolution
from light_tts.kernels.dispatch import flow_attention, frame_norm
from light_tts.models.fusion import fuse_linears
from light_tts.models.flow.unet_blocks import sinusoidal_time_embedding


def _causal_conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A CausalConv1d (or plain k=1 conv) on (B, C, T): symmetric padding, keep the first T frames."""
    pad = conv.kernel_size[0] - 1
    y = F.conv1d(x, conv.weight, conv.bias, padding=pad)
    return y[:, :, :x.size(-1)] if pad else y


def _btc(x: torch.Tensor) -> torch.Tensor:
    """A (B, C, T) tensor as the [B, T, C] view frame_norm reads and writes."""
    return x.transpose(1, 2)


class FusedEstimator(FrameStep):
    """The estimator step of the batched solver: forward(x, mask, mu, t, spks, cond, attn:
    FrameAttention) -> (B, 80, T)."""

    def __init__(self, estimator: nn.Module):
        super().__init__()
        check_single_resolution(estimator, "the fused estimator")
        self.estimator = estimator
        self.stages = [*estimator.down_blocks, *estimator.mid_blocks, *estimator.up_blocks]
        self.chunk_frames = int(estimator.static_chunk_size)
        first = self.stages[0].transformers[0].attn1
        self.heads, self.head_dim = first.heads, first.to_q.out_features // first.heads
        self.inner = first.to_q.out_features   # heads x head_dim: the width of a key or value
        self.n_layers = sum(len(stage.transformers) for stage in self.stages)
        # the causal convolutions (kernel > 1) in call order -> offset of their context in ctx:
        # (C_in, kernel - 1) input frames before the first computed frame, flattened
        convs = []
        for stage in self.stages:
            convs += [stage.resnet.block1.block[0], stage.resnet.block2.block[0]]
            if stage.resample is not None:
                convs.append(stage.resample)
        convs.append(estimator.final_block.block[0])
        pads = {conv.kernel_size[0] - 1 for conv in convs}
        if len(pads) != 1:
            raise ValueError(f"the fused estimator expects one causal kernel size, got paddings {sorted(pads)}")
        self.ctx_pad = pads.pop()   # the prompt cache keeps this many input frames per conv
        self.ctx_offset, size = {}, 0
        for conv in convs:
            self.ctx_offset[id(conv)] = size
            size += conv.in_channels * self.ctx_pad
        self.ctx_size = size
        # (stage, block) -> [Wq; Wk; Wv]; one (n_stages * C, time_dim) projection for every resnet
        self.qkv = [[fuse_linears((b.attn1.to_q, b.attn1.to_k, b.attn1.to_v))[0] for b in stage.transformers]
                    for stage in self.stages]
        self.time_w, self.time_b = fuse_linears([s.resnet.mlp[1] for s in self.stages])

    def _conv(self, x: torch.Tensor, conv: nn.Conv1d, attn: FrameAttention) -> torch.Tensor:
        """A causal conv on (B, Cin, T) whose left context is the row's cached prefix (attn.ctx),
        or zeros; with attn.record, the input frames before the prefix end are stored."""
        pad = conv.kernel_size[0] - 1
        if pad == 0:
            return F.conv1d(x, conv.weight, conv.bias)
        off = self.ctx_offset[id(conv)]
        if attn.record is not None:
            attn.record.context(attn.step, off, x)
        if attn.ctx is None:
            return _causal_conv(x, conv)
        left = attn.ctx[:, attn.step, off:off + conv.in_channels * pad].view(x.size(0), conv.in_channels, pad)
        return F.conv1d(torch.cat([left.to(x.dtype), x], dim=2), conv.weight, conv.bias)

    def _resnet(self, res, xm: torch.Tensor, mask: torch.Tensor, t_proj: torch.Tensor,
                attn: FrameAttention) -> torch.Tensor:
        """CausalResnetBlock1D on masked xm (B, Cin, T) -> (B, T, C) rows for the transformers."""
        n1, n2 = res.block1.block[2], res.block2.block[2]
        c1 = self._conv(xm, res.block1.block[0], attn)
        b, c, t = c1.shape
        hm = torch.empty(b, c, t, device=xm.device, dtype=xm.dtype)
        # block1(x) * mask + mlp(t_emb), masked again by block2's input product: (y + t) * mask
        frame_norm(_btc(c1), _btc(hm), weight=n1.weight, bias=n1.bias, eps=n1.eps, mish=True, mask=mask,
                   post_add=t_proj.unsqueeze(1).expand(b, t, c), mask_end=True)
        c2 = self._conv(hm, res.block2.block[0], attn)
        skip = self._conv(xm, res.res_conv, attn)
        h = torch.empty(b, t, c, device=xm.device, dtype=xm.dtype)
        # block2(h) * mask + res_conv(x * mask)
        return frame_norm(_btc(c2), h, weight=n2.weight, bias=n2.bias, eps=n2.eps, mish=True, mask=mask,
                          post_add=_btc(skip))

    def _transformers(self, blocks, qkv_weights, h: torch.Tensor, mask: torch.Tensor, attn: FrameAttention,
                      layer: int) -> torch.Tensor:
        """The stage's transformer blocks on (B, T, C) rows h (updated in place) -> masked (B, C, T)."""
        b, t, c = h.shape
        first = blocks[0].norm1
        n = frame_norm(h, torch.empty_like(h), weight=first.weight, bias=first.bias, eps=first.eps)
        out = None
        for i, (block, w_qkv) in enumerate(zip(blocks, qkv_weights)):
            proj = block.attn1
            qkv = F.linear(n, w_qkv).view(b, t, 3, self.heads, self.head_dim)
            q, k, v = qkv.unbind(2)
            if attn.record is not None:
                attn.record.keys(attn.step, layer + i, qkv[:, :, 1:])
            k_pool, v_pool = self._pools(attn, layer + i, q)
            o = flow_attention(q, k, v, attn.lengths, attn.streaming, attn.prefix_start, attn.prefix_len, k_pool, v_pool,
                               self.chunk_frames, self.head_dim ** -0.5, branch_rows=attn.branch_rows,
                               stream_start=attn.stream_start, stream_len=attn.stream_len)
            a = F.linear(o.view(b, t, -1), proj.to_out[0].weight)
            n3 = block.norm3
            n = frame_norm(h, n, delta=a, pre_bias=proj.to_out[0].bias, sum_out=h, weight=n3.weight, bias=n3.bias,
                           eps=n3.eps)
            ff1, ff2 = block.ff.net[0].proj, block.ff.net[2]
            f = F.linear(F.gelu(F.linear(n, ff1.weight, ff1.bias)), ff2.weight)
            if i + 1 < len(blocks):
                nxt = blocks[i + 1].norm1
                n = frame_norm(h, n, delta=f, pre_bias=ff2.bias, sum_out=h, weight=nxt.weight, bias=nxt.bias,
                               eps=nxt.eps)
            else:
                out = torch.empty(b, c, t, device=h.device, dtype=h.dtype)
                frame_norm(h, _btc(out), delta=f, pre_bias=ff2.bias, mask=mask)
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, attn: FrameAttention) -> torch.Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T); t (B,); spks (B, 80); attn: the rows' lengths,
        mask kinds and cached prefixes (batched_flow.FrameAttention)."""
        est = self.estimator
        frames = mask[:, 0, :]
        t_emb = est.time_mlp(sinusoidal_time_embedding(t, est.in_channels))
        t_proj = F.linear(F.mish(t_emb), self.time_w, self.time_b).view(t_emb.size(0), len(self.stages), -1)
        xm = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.size(-1)), cond], dim=1) * mask
        n_down = len(est.down_blocks)
        skip = None
        layer = 0
        for i, stage in enumerate(self.stages):
            if i >= n_down + len(est.mid_blocks):   # up stage: [x | skip], both masked
                xm = torch.cat([xm[:, :, :skip.size(-1)], skip], dim=1)
            h = self._resnet(stage.resnet, xm, frames, t_proj[:, i], attn)
            xm = self._transformers(stage.transformers, self.qkv[i], h, frames, attn, layer)
            layer += len(stage.transformers)
            if stage.resample is not None:
                if i < n_down:
                    skip = xm
                xm = self._conv(xm, stage.resample, attn) * mask
        fb = est.final_block.block
        y = self._conv(xm, fb[0], attn)
        ym = torch.empty_like(y)
        frame_norm(_btc(y), _btc(ym), weight=fb[2].weight, bias=fb[2].bias, eps=fb[2].eps, mish=True, mask=frames,
                   mask_end=True)
        return F.conv1d(ym, est.final_proj.weight, est.final_proj.bias) * mask
