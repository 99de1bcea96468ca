"""Conformer pieces of the flow encoder (ESPnet relative-position flavour).

Key names follow the official modules: `embed.out.{0,1}`, `self_attn.linear_{q,k,v,out,pos}`,
`self_attn.pos_bias_{u,v}`, `feed_forward.w_{1,2}`, `norm_mha`, `norm_ff`.
Only the configuration CosyVoice2 uses is implemented: pre-norm layers, no macaron
feed-forward, no convolution module.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class RelPositionalEncoding(nn.Module):
    """ESPnet relative positional encoding: scales x by sqrt(d) and returns the
    sinusoid table for relative positions +(T-1) ... -(T-1), shape (1, 2T-1, d).

    The table is not a parameter or buffer (the official one is a plain attribute,
    so it never shows up in state_dict); we build it in fp32 once for `max_len` and
    keep one cast copy per (device, dtype).
    """

    def __init__(self, d_model: int, dropout_rate: float = 0.0, max_len: int = 5000):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.max_len = max_len
        self._table: torch.Tensor | None = None  # fp32, CPU
        self._cast: dict[tuple, torch.Tensor] = {}
        # Tables replaced by a longer one stay alive: CUDA graphs captured with them
        # (light_tts.server.decode.cuda_graph.GraphEncoder) keep reading their memory.
        self._retired: list[torch.Tensor] = []

    def _build(self, length: int) -> torch.Tensor:
        pos = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
        inv_freq = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32)
                             * -(math.log(10000.0) / self.d_model))
        left = torch.zeros(length, self.d_model)   # keys to the left: +p
        right = torch.zeros(length, self.d_model)  # keys to the right: -p
        left[:, 0::2] = torch.sin(pos * inv_freq)
        left[:, 1::2] = torch.cos(pos * inv_freq)
        right[:, 0::2] = torch.sin(-1 * pos * inv_freq)
        right[:, 1::2] = torch.cos(-1 * pos * inv_freq)
        # +(L-1) ... +1, 0, -1 ... -(L-1): centre (relative 0) at index L-1
        return torch.cat([torch.flip(left, [0]), right[1:]], dim=0).unsqueeze(0)

    def table(self, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self._table is None or self._table.size(1) < 2 * size - 1:
            self._table = self._build(max(self.max_len, size))
            self._retired.extend(self._cast.values())
            self._cast.clear()
        key = (device, dtype)
        if key not in self._cast:
            self._cast[key] = self._table.to(device=device, dtype=dtype)
        return self._cast[key]

    def relative(self, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, 2 * size - 1, d): the rows for relative positions +(size-1) ... -(size-1)."""
        pe = self.table(size, device, dtype)
        centre = pe.size(1) // 2
        return pe[:, centre - size + 1: centre + size]

    def forward(self, x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.xscale, self.relative(x.size(1) + offset, x.device, x.dtype)


class LinearEmbed(nn.Module):
    """Linear -> LayerNorm (-> dropout) then the relative positional encoding
    (official LinearNoSubsampling; keys `out.0`, `out.1`)."""

    def __init__(self, idim: int, odim: int, dropout_rate: float = 0.0):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Dropout(dropout_rate))
        self.pos_enc = RelPositionalEncoding(odim, dropout_rate)

    def forward(self, x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pos_enc(self.out(x), offset)


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T-1) position scores -> (B, H, T, T) with out[i, j] = scores[i, T-1-i+j],
    i.e. the score of relative position i-j (the table runs from +(T-1) down to -(T-1))."""
    b, h, t, width = scores.shape
    scores = scores.contiguous()
    s_b, s_h, s_t, s_w = scores.stride()
    return scores.as_strided((b, h, t, t), (s_b, s_h, s_t - s_w, s_w),
                             scores.storage_offset() + (t - 1) * s_w)


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL style relative positions
    (content bias u, position bias v). Softmax runs in fp32."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float = 0.0, key_bias: bool = True):
        super().__init__()
        assert n_feat % n_head == 0
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); mask (B, 1 or T, T) bool; pos_emb (1, 2T-1, D)."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)            # (B, T, H, dk)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)

        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        if position.shape != content.shape:
            position = rel_shift(position)
        scores = (content + position) / math.sqrt(self.d_k)

        hidden = ~mask.unsqueeze(1)                                     # (B, 1, T|1, T)
        attn = torch.softmax(scores.float().masked_fill(hidden, -float("inf")), dim=-1)
        attn = attn.masked_fill(hidden, 0.0).to(v.dtype)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, idim: int, hidden_units: int, dropout_rate: float = 0.0):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))  # the official "swish" activation


class ConformerLayer(nn.Module):
    """Pre-norm: x + MHA(LN(x)), then x + FFN(LN(x)). LayerNorm eps 1e-12 as official."""

    def __init__(self, size: int, attention_heads: int, linear_units: int, key_bias: bool = True):
        super().__init__()
        self.self_attn = RelPositionAttention(attention_heads, size, key_bias=key_bias)
        self.feed_forward = PositionwiseFeedForward(size, linear_units)
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))
