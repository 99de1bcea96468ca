"""FusedDiT: CosyVoice3's DiT step for the batched solver, taking a `FrameAttention` (the chunk mask
as a rule: kernels/flow_attention.py) instead of a dense (B, 1, T, T) bias, so that a row can
continue a cached prefix and the prompt cache (prompt_cache.py) serves the DiT as it serves
CosyVoice2's U-Net (FusedEstimator).

Why a cached prefix is exact for the DiT (light_tts.models.flow.dit says the architecture):
- in streaming mode attention is chunk-causal, so the keys and values of completed chunks never
  change; the rotary positions are absolute frame indices from 0, so a row that starts after P
  cached frames rotates its q and k by P + i, and the cached keys were stored rotated at theirs;
- the position embedding is two causal grouped convs (kernel 31): a row that continues a prefix
  starts them from the 30 input frames before its first frame (the cache's conv context) instead
  of the zeros before frame 0;
- everything else (input projection, AdaLN modulation, feed-forward, output norm) is per frame.

What is fused against DiT.forward_masked, because at small batches the step is launch bound (about
40 kernels per block, 22 blocks, 10 Euler steps per solver call): q/k/v are one GEMM per block;
every block's AdaLN modulation plus the output norm's are one GEMM from the time embedding, with
the 1 of (1 + scale) added once for all; a modulated norm is layer_norm then one addcmul, a gated
residual one addcmul; the rotary rotation turns q and k together, in place in the q/k/v output.
Same math up to rounding (tests/test_fused_dit.py). Build it after the weights are loaded and
cast: the modules' own parameters become views of the fused ones (models/fusion.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from light_tts.kernels.dispatch import flow_attention
from light_tts.models.flow.dit import LN_EPS, DiT, rotate_pairs
from light_tts.models.fusion import fuse_linears
from light_tts.server.decode.batched_flow import FrameAttention, FrameStep


class FusedDiT(FrameStep):
    """forward(x, mask, mu, t, spks, cond, attn: FrameAttention) -> velocity (B, 80, T)."""

    def __init__(self, dit: DiT):
        super().__init__()
        if not isinstance(dit, DiT):
            raise TypeError(f"FusedDiT needs CosyVoice3's DiT estimator, not {type(dit).__name__}")
        self.estimator = dit
        self.blocks = list(dit.transformer_blocks)
        self.chunk_frames = int(dit.static_chunk_size)
        first = self.blocks[0].attn
        self.heads, self.head_dim = first.heads, first.dim_head
        self.inner = first.heads * first.dim_head   # the width of a key or value (prompt_cache.frame_bytes)
        self.n_layers = len(self.blocks)
        pos = dit.input_embed.conv_pos_embed
        self.convs = (pos.conv1[0], pos.conv2[0])
        self.ctx_pad = pos.kernel_size - 1   # the prompt cache keeps this many input frames per conv
        self.ctx_offset = {id(c): i * c.in_channels * self.ctx_pad for i, c in enumerate(self.convs)}
        self.ctx_size = sum(c.in_channels for c in self.convs) * self.ctx_pad
        if self.chunk_frames > 0 and self.ctx_pad > self.chunk_frames:
            # a pass keeps at least one whole chunk: the context it records must lie within it
            raise ValueError(f"FusedDiT: the position convs' context ({self.ctx_pad} frames) exceeds the "
                             f"{self.chunk_frames}-frame chunk")
        self.qkv = [fuse_linears((b.attn.to_q, b.attn.to_k, b.attn.to_v)) for b in self.blocks]
        self.mod_w, self.mod_b = fuse_linears([b.attn_norm.linear for b in self.blocks] + [dit.norm_out.linear])
        # the modulations' bias plus 1 at every scale column (blocks: shift, scale, gate, shift, scale,
        # gate; the output norm: scale, shift), so the GEMM gives (1 + scale) directly
        d = dit.dim
        one = torch.zeros(self.mod_w.size(0), dtype=self.mod_w.dtype, device=self.mod_w.device)
        for i in range(self.n_layers):
            one[6 * d * i + d:6 * d * i + 2 * d] = 1
            one[6 * d * i + 4 * d:6 * d * i + 5 * d] = 1
        one[6 * d * self.n_layers:6 * d * self.n_layers + d] = 1
        self.register_buffer("mod_bias1", self.mod_b + one, persistent=False)

    def _conv(self, x: torch.Tensor, conv: nn.Conv1d, attn: FrameAttention) -> torch.Tensor:
        """A causal position conv on (B, C, T) whose left context is the row's cached prefix
        (attn.ctx) or zeros (the official left padding); with attn.record its input frames before
        each recording row's end are kept (counted on the padded input: a chunk shorter than the
        kernel still records what the next one needs)."""
        pad, off = self.ctx_pad, self.ctx_offset[id(conv)]
        b, c, _ = x.shape
        if attn.ctx is None:
            left = x.new_zeros(b, c, pad)
        else:
            left = attn.ctx[:, attn.step, off:off + c * pad].view(b, c, pad).to(x.dtype)
        xp = torch.cat([left, x], dim=2)
        if attn.record is not None:
            attn.record.context(attn.step, off, xp, lead=pad)
        return F.conv1d(xp, conv.weight, conv.bias, groups=conv.groups)

    def _rope(self, attn: FrameAttention, frames: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (B, T, head_dim) at each row's absolute frames: after its cached prefix."""
        inv_freq = self.estimator.rotary_embed.inv_freq.float()
        first = (attn.prefix_len + attn.stream_len).float()
        pos = first.unsqueeze(1) + torch.arange(frames, device=device, dtype=torch.float32)
        angles = (pos.unsqueeze(-1) * inv_freq).repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()

    @staticmethod
    def _rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """apply_rotary on q and k at once, in place: qkv (B, T, 3, inner), the first cos.size(-1)
        channels of q and k turned by interleaved pairs in fp32 (as the plain DiT)."""
        x = qkv[:, :, :2, :cos.size(-1)]
        x.copy_(rotate_pairs(x.float(), cos.unsqueeze(2), sin.unsqueeze(2)))

    @staticmethod
    def _modulate(h: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor) -> torch.Tensor:
        """LayerNorm (no affine) of h (B, T, C), times (1 + scale) plus shift, per row."""
        n = F.layer_norm(h, (h.size(-1),), eps=LN_EPS)
        return torch.addcmul(shift.unsqueeze(1), n, scale1.unsqueeze(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, attn: FrameAttention) -> torch.Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T); t (B,); spks (B, spk_dim); attn: the rows'
        lengths, mask kinds and cached prefixes."""
        dit = self.estimator
        b, _, n = x.shape
        dim, hd = dit.dim, self.head_dim
        # (B, depth * 6 dim + 2 dim), the scale columns already 1 + scale
        mods = torch.addmm(self.mod_bias1, F.silu(dit.time_embed(t)), self.mod_w.t())
        embed = dit.input_embed
        parts = [x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2)]
        if embed.spk_dim > 0:
            parts.append(spks.unsqueeze(1).expand(-1, n, -1))
        h = embed.proj(torch.cat(parts, dim=-1))                                 # (B, T, dim)
        p = F.mish(self._conv(h.transpose(1, 2), self.convs[0], attn))
        h = F.mish(self._conv(p, self.convs[1], attn)).transpose(1, 2) + h
        cos, sin = self._rope(attn, n, x.device)
        hidden = ~mask.bool().transpose(1, 2)                                   # (B, T, 1) padded frames
        residual = h
        for i, block in enumerate(self.blocks):
            shift, scale1, gate, shift_ff, scale1_ff, gate_ff = mods[:, 6 * dim * i:6 * dim * (i + 1)].chunk(6, dim=1)
            qkv = F.linear(self._modulate(h, shift, scale1), *self.qkv[i]).view(b, n, 3, self.inner)
            self._rotate_qk(qkv, cos, sin)
            q, k, v = (qkv[:, :, j].view(b, n, self.heads, hd) for j in range(3))
            if attn.record is not None:
                attn.record.keys(attn.step, i, qkv[:, :, 1:].view(b, n, 2, self.heads, hd))
            k_pool, v_pool = self._pools(attn, i, q)
            o = flow_attention(q, k, v, attn.lengths, attn.streaming, attn.prefix_start, attn.prefix_len, k_pool,
                               v_pool, self.chunk_frames, hd ** -0.5, branch_rows=attn.branch_rows,
                               stream_start=attn.stream_start, stream_len=attn.stream_len)
            o = block.attn.to_out[0](o.view(b, n, self.inner)).masked_fill_(hidden, 0.0)
            h = torch.addcmul(h, gate.unsqueeze(1), o)
            h = torch.addcmul(h, gate_ff.unsqueeze(1), block.ff(self._modulate(h, shift_ff, scale1_ff)))
        if dit.long_skip_connection is not None:
            h = dit.long_skip_connection(torch.cat((h, residual), dim=-1))
        scale1, shift = mods[:, 6 * dim * len(self.blocks):].chunk(2, dim=1)
        return dit.proj_out(self._modulate(h, shift, scale1)).transpose(1, 2)
