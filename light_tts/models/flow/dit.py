"""CosyVoice3 flow-matching velocity estimator: the official DiT (cosyvoice/flow/DiT), inference only.

forward(x, mask, mu, t, spks, cond, streaming) -> velocity (B, 80, T), the same call as the
CosyVoice2 U-Net, so light_tts.models.flow.cfm.CausalConditionalCFM drives either.

  input   Linear([x | cond | mu | spk] = 4 x 80 -> dim), plus a causal grouped-conv position
          embedding (two k=31 convs, 16 groups, Mish, left padding only)
  blocks  depth x DiT block with AdaLN-Zero modulation from the time embedding:
          x += gate_a * Attn(LN(x) * (1 + scale_a) + shift_a)
          x += gate_f * FF(LN(x) * (1 + scale_f) + shift_f)     (FF: Linear, tanh-GELU, Linear)
  output  LN(x) * (1 + scale) + shift -> Linear(dim -> 80)

Rotary positions follow x_transformers' RotaryEmbedding / apply_rotary_pos_emb as the official
attention calls them: interleaved pairs (2i, 2i+1) rotate by pos * inv_freq[i], base 10000, no
xpos, and they are applied to the projected q and k BEFORE the split into heads with a rotary
width of dim_head: only the first dim_head channels (head 0) are rotated, the other heads carry
no position information apart from the conv position embedding. This is the official behaviour.

Streaming: attention is chunk-causal over static_chunk_size frames (all left chunks visible; the
official passes -1 whatever num_decoding_left_chunks says) and the conv position embedding is
causal, so a frame never depends on frames of later chunks. Padded frames are hidden as keys and
zeroed after each attention, as the official does.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .masks import row_attention_mask
from .unet_blocks import sinusoidal_time_embedding

TIME_FREQ_DIM = 256  # official TimestepEmbedding(dim, freq_embed_dim=256)
LN_EPS = 1e-6


class TimestepEmbedding(nn.Module):
    """(B,) t -> sinusoidal(256, scale 1000) -> Linear -> SiLU -> Linear. Key `time_mlp.{0,2}`."""

    def __init__(self, dim: int, freq_dim: int = TIME_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(sinusoidal_time_embedding(t, self.freq_dim))


class CausalConvPositionEmbedding(nn.Module):
    """Two grouped convs (k, left padding k-1) each followed by Mish. Keys `conv{1,2}.0`."""

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        h = x.transpose(1, 2)
        h = self.conv1(F.pad(h, (self.kernel_size - 1, 0)))
        h = self.conv2(F.pad(h, (self.kernel_size - 1, 0)))
        return h.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, mu_dim: int, out_dim: int, spk_dim: int = 0):
        super().__init__()
        self.spk_dim = spk_dim
        self.proj = nn.Linear(mel_dim * 2 + mu_dim + spk_dim, out_dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor,
                spks: torch.Tensor | None) -> torch.Tensor:
        """x, cond, mu (B, T, 80); spks (B, spk_dim) -> (B, T, dim). Concatenation order is official."""
        parts = [x, cond, mu]
        if self.spk_dim > 0:
            parts.append(spks.unsqueeze(1).expand(-1, x.size(1), -1))
        h = self.proj(torch.cat(parts, dim=-1))
        return self.conv_pos_embed(h) + h


class RotaryEmbedding(nn.Module):
    """x_transformers.RotaryEmbedding(dim) without xpos: holds the (persistent) `inv_freq` buffer."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cos, sin), each (T, dim) float32, every angle repeated for its interleaved pair.
        Angles are formed in fp32 (the official forms them in the buffer's dtype, i.e. fp16
        after .half(), which rounds positions above 2048)."""
        inv_freq = self.inv_freq.float()
        angles = torch.outer(torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32), inv_freq)
        angles = angles.repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.size(-1) channels of x (B, T, C) by interleaved pairs; the rest pass.
    pair (a, b) -> (a cos - b sin, b cos + a sin), computed in fp32, returned in x's dtype."""
    n = cos.size(-1)
    rot = rotate_pairs(x[..., :n].float(), cos, sin)
    return torch.cat((rot.to(x.dtype), x[..., n:]), dim=-1)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., n) turned by interleaved pairs: (a, b) -> (a cos - b sin, b cos + a sin)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack((-b, a), dim=-1).flatten(-2) * sin


class AdaLayerNormZero(nn.Module):
    """LayerNorm (no affine) modulated from the time embedding; `linear` gives 6 x dim:
    shift/scale/gate for attention, then shift/scale/gate for the feed-forward."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * 6)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift, scale, gate, shift_ff, scale_ff, gate_ff = self.linear(F.silu(emb)).chunk(6, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], gate, shift_ff, scale_ff, gate_ff


class AdaLayerNormZeroFinal(nn.Module):
    """The output norm: `linear` gives scale then shift (this order, unlike the blocks)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class Attention(nn.Module):
    """Self-attention; keys `to_{q,k,v}`, `to_out.0` (the official `to_out.1` is a dropout)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                frame_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim); attn_mask bool (B, 1, T|1, T); frame_mask bool (B, T, 1)."""
        b, t, _ = x.shape
        cos, sin = rope
        q = apply_rotary(self.to_q(x), cos, sin)
        k = apply_rotary(self.to_k(x), cos, sin)
        v = self.to_v(x)
        q, k, v = (y.view(b, t, self.heads, self.dim_head).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.to_out[0](out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head))
        return out.masked_fill(~frame_mask, 0.0)


class FeedForward(nn.Module):
    """Keys `ff.0.0`, `ff.2` (index 1 is the official dropout)."""

    def __init__(self, dim: int, mult: float = 4):
        super().__init__()
        inner = int(dim * mult)
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
                                nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: float = 4):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, t: torch.Tensor, attn_mask: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], frame_mask: torch.Tensor) -> torch.Tensor:
        h, gate, shift_ff, scale_ff, gate_ff = self.attn_norm(x, t)
        x = x + gate.unsqueeze(1) * self.attn(h, attn_mask, rope, frame_mask)
        h = self.ff_norm(x) * (1 + scale_ff[:, None]) + shift_ff[:, None]
        return x + gate_ff.unsqueeze(1) * self.ff(h)


class DiT(nn.Module):
    def __init__(self, dim: int, depth: int = 8, heads: int = 8, dim_head: int = 64, dropout: float = 0.1,
                 ff_mult: float = 4, mel_dim: int = 80, mu_dim: int | None = None,
                 long_skip_connection: bool = False, spk_dim: int | None = None, out_channels: int | None = None,
                 static_chunk_size: int = 50, num_decoding_left_chunks: int = 2, **unused):
        """Keyword names and defaults as the official DiT (dropout is inference-irrelevant)."""
        super().__init__()
        self.dim, self.depth, self.mel_dim = dim, depth, mel_dim
        self.out_channels = out_channels
        self.static_chunk_size = int(static_chunk_size)
        self.num_decoding_left_chunks = num_decoding_left_chunks  # stored only: the official ignores it
        self.time_embed = TimestepEmbedding(dim)
        self.input_embed = InputEmbedding(mel_dim, mel_dim if mu_dim is None else mu_dim, dim, spk_dim or 0)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(dim, heads, dim_head, ff_mult) for _ in range(depth)])
        self.long_skip_connection = nn.Linear(dim * 2, dim, bias=False) if long_skip_connection else None
        self.norm_out = AdaLayerNormZeroFinal(dim)
        self.proj_out = nn.Linear(dim, mel_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                streaming=False) -> torch.Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T) (any dtype, nonzero = real frame); t (B,) or scalar;
        spks (B, spk_dim); streaming: bool, or a (B,) bool tensor choosing the chunk mask per row."""
        attn_mask = row_attention_mask(mask.bool(), self.static_chunk_size, streaming).unsqueeze(1)
        return self.forward_masked(x, mask, mu, t, spks, cond, attn_mask)

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                       spks: torch.Tensor | None, cond: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """forward with the attention mask given: bool (B, 1, T|1, T), True = visible, or the same as
        an additive bias (the batched decode engine's dense bias, light_tts.server.decode.batched_flow)."""
        b, _, n = x.shape
        if t.ndim == 0:
            t = t.repeat(b)
        t_emb = self.time_embed(t)
        h = self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks)
        rope = self.rotary_embed(n)
        frame_mask = mask.bool().transpose(1, 2)  # (B, T, 1)
        residual = h
        for block in self.transformer_blocks:
            h = block(h, t_emb, attn_mask, rope, frame_mask)
        if self.long_skip_connection is not None:
            h = self.long_skip_connection(torch.cat((h, residual), dim=-1))
        return self.proj_out(self.norm_out(h, t_emb)).transpose(1, 2)
