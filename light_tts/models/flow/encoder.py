"""Token encoder of the CosyVoice2 flow (official UpsampleConformerEncoder).

tokens (B, T, D) -> linear embed -> pre-lookahead conv -> conformer x num_blocks
-> x2 nearest upsample + causal conv -> linear embed -> conformer x 4 -> LayerNorm
-> (B, 2T, D) at the mel frame rate.

Streaming uses static chunk masks (chunk_size tokens, then chunk_size*2 frames
after upsampling), so a chunk's output never depends on later chunks; the
pre-lookahead conv is the only part that looks `pre_lookahead_len` tokens ahead.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .conformer import ConformerLayer, LinearEmbed
from .masks import row_attention_mask, valid_mask


class PreLookaheadLayer(nn.Module):
    """Residual: conv(k = lookahead+1, looking right) -> leaky_relu -> causal conv(k=3)."""

    def __init__(self, channels: int, pre_lookahead_len: int = 3):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C); context (B, L, C) = the next L<=lookahead frames after x, or None.

        Without context the look-ahead sees zeros past the end (final chunk).
        """
        h = x.transpose(1, 2)
        if context is not None and context.size(1) > 0:
            assert context.size(1) <= self.pre_lookahead_len
            h = torch.cat([h, context.transpose(1, 2)], dim=2)
            pad = self.pre_lookahead_len - context.size(1)
        else:
            pad = self.pre_lookahead_len
        h = F.leaky_relu(self.conv1(F.pad(h, (0, pad))))
        h = self.conv2(F.pad(h, (self.conv2.kernel_size[0] - 1, 0)))
        return h.transpose(1, 2) + x


class CausalUpsample(nn.Module):
    """Nearest-neighbour x`stride` then a causal conv of width 2*stride+1 (key `conv`)."""

    def __init__(self, channels: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, stride * 2 + 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, T) -> (B, C, stride*T)."""
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        x = self.conv(F.pad(x, (self.stride * 2, 0)))
        return x, lengths * self.stride


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, input_size: int = 512, output_size: int = 512, attention_heads: int = 8,
                 linear_units: int = 2048, num_blocks: int = 6, static_chunk_size: int = 25,
                 pre_lookahead_len: int = 3, upsample_stride: int = 2, num_up_blocks: int = 4,
                 key_bias: bool = True, normalize_before: bool = True, input_layer: str = "linear",
                 pos_enc_layer_type: str = "rel_pos_espnet", selfattention_layer_type: str = "rel_selfattn",
                 activation_type: str = "swish", macaron_style: bool = False, use_cnn_module: bool = False,
                 **unused):
        """Sizes as the official yaml names them. The official code hard-codes 512 channels,
        a 3-token look-ahead, x2 upsampling and 4 upsampled blocks; we take them from
        `output_size` / arguments (same values for the official config). Training-only
        kwargs (dropout rates, dynamic chunking) are accepted and ignored."""
        super().__init__()
        if (not normalize_before or input_layer != "linear" or pos_enc_layer_type != "rel_pos_espnet"
                or selfattention_layer_type != "rel_selfattn" or activation_type != "swish"
                or macaron_style or use_cnn_module):
            raise ValueError("UpsampleConformerEncoder: only the CosyVoice2 flow configuration is supported "
                             "(pre-norm, linear input, rel_pos_espnet, rel_selfattn, swish, no macaron, no cnn)")
        if input_size != output_size:
            # the upsampled branch re-embeds output_size features with a Linear(input_size, ...)
            raise ValueError(f"UpsampleConformerEncoder needs input_size == output_size, got {input_size} != {output_size}")
        self._output_size = output_size
        self.static_chunk_size = int(static_chunk_size)
        self.embed = LinearEmbed(input_size, output_size)
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)  # registered here to keep the official key order
        self.pre_lookahead_layer = PreLookaheadLayer(output_size, pre_lookahead_len)
        self.encoders = nn.ModuleList(
            [ConformerLayer(output_size, attention_heads, linear_units, key_bias) for _ in range(num_blocks)])
        self.up_layer = CausalUpsample(output_size, upsample_stride)
        self.up_embed = LinearEmbed(input_size, output_size)
        self.up_encoders = nn.ModuleList(
            [ConformerLayer(output_size, attention_heads, linear_units, key_bias) for _ in range(num_up_blocks)])

    def output_size(self) -> int:
        return self._output_size

    @property
    def pre_lookahead_len(self) -> int:
        return self.pre_lookahead_layer.pre_lookahead_len

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor, context: torch.Tensor | None = None,
                streaming: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """xs (B, T, D) token embeddings (zero past each length), xs_lens (B,) valid tokens in xs.
        context (B, L, D): embeddings of the look-ahead tokens that follow xs (not finalised
        chunk), or None (final chunk: the look-ahead sees zeros).
        Returns (B, stride*T, D) and its frame mask (B, 1, stride*T) bool.

        Batch > 1 with context: every row's context must directly follow its xs_lens
        tokens, which with right padding only holds when all rows have equal length
        (forward_rows takes rows of different lengths).
        """
        t = xs.size(1)
        token_lens = xs_lens
        if context is not None and context.size(1) > 0:
            xs = torch.cat([xs, context], dim=1)
            token_lens = xs_lens + context.size(1)
        return self.forward_rows(xs, xs_lens, token_lens, t, streaming)

    def forward_rows(self, xs: torch.Tensor, xs_lens: torch.Tensor, token_lens: torch.Tensor, t: int,
                     streaming) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of different lengths and kinds in one call. Row i of xs (B, W, D) holds its
        xs_lens[i] tokens, then its look-ahead tokens up to token_lens[i] (none for a final
        chunk), then anything (masked here). t = max(xs_lens). streaming: bool, or (B,) bool per
        row. Returns (B, stride*t, D) and the frame mask (B, 1, stride*t) bool; row i's frames past
        stride*xs_lens[i] are padding.

        Each row's valid frames equal those of the row alone: the embedding is per token, the
        look-ahead conv of token j reads tokens j..j+L of its own row (its context or zeros), the
        second conv and the upsampling conv are causal, and attention masks every row's padding.
        """
        k = self.pre_lookahead_len
        xs, _ = self.embed(xs)
        # zero past each row's tokens, so a row's look-ahead sees zeros where it would alone
        xs = xs * valid_mask(token_lens, xs.size(1)).transpose(1, 2).to(xs.dtype)
        if xs.size(1) < t + k:
            xs = F.pad(xs, (0, 0, 0, t + k - xs.size(1)))
        xs = self.pre_lookahead_layer(xs[:, :t], xs[:, t:t + k])
        masks = valid_mask(xs_lens, t)
        pos_emb = self.embed.pos_enc.relative(t, xs.device, xs.dtype)
        chunk_masks = row_attention_mask(masks, self.static_chunk_size, streaming)
        for layer in self.encoders:
            xs = layer(xs, chunk_masks, pos_emb)

        xs, xs_lens = self.up_layer(xs.transpose(1, 2), xs_lens)
        xs = xs.transpose(1, 2)
        masks = valid_mask(xs_lens, xs.size(1))
        xs, pos_emb = self.up_embed(xs)
        chunk_masks = row_attention_mask(masks, self.static_chunk_size * self.up_layer.stride, streaming)
        for layer in self.up_encoders:
            xs = layer(xs, chunk_masks, pos_emb)
        return self.after_norm(xs), masks
