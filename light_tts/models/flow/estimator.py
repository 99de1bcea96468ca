"""Flow-matching velocity estimator (official CausalConditionalDecoder): a 1-D U-Net over
[x | mu | spk | cond] (4 x 80 channels) with causal convs and transformer blocks.

forward(x, mask, mu, t, spks, cond, streaming) -> velocity (B, 80, T). With streaming the
attention is chunk-causal (static_chunk_size frames), so together with the causal convs
frame i never depends on frames in later chunks.
"""
from __future__ import annotations

import torch
from torch import nn

from .masks import attention_mask, mask_to_bias
from .unet_blocks import (CausalBlock1D, CausalConv1d, CausalResnetBlock1D, Downsample1D, TimestepEmbedding,
                          TransformerBlock, UNetStage, Upsample1D, sinusoidal_time_embedding)


class CausalConditionalDecoder(nn.Module):
    def __init__(self, in_channels: int = 320, out_channels: int = 80, channels=(256,), dropout: float = 0.0,
                 attention_head_dim: int = 64, n_blocks: int = 4, num_mid_blocks: int = 12, num_heads: int = 8,
                 act_fn: str = "gelu", static_chunk_size: int = 50, num_decoding_left_chunks: int = -1, **unused):
        super().__init__()
        channels = tuple(channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.static_chunk_size = int(static_chunk_size)
        self.num_decoding_left_chunks = num_decoding_left_chunks  # only -1 (all left chunks) exists officially
        time_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(in_channels, time_dim)

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList([TransformerBlock(dim, num_heads, attention_head_dim, dropout, act_fn)
                                  for _ in range(n_blocks)])

        self.down_blocks = nn.ModuleList()
        dim_in = in_channels
        for i, dim in enumerate(channels):
            last = i == len(channels) - 1
            self.down_blocks.append(UNetStage([
                CausalResnetBlock1D(dim_in, dim, time_dim), transformers(dim),
                CausalConv1d(dim, dim, 3) if last else Downsample1D(dim)]))
            dim_in = dim
        self.mid_blocks = nn.ModuleList([
            UNetStage([CausalResnetBlock1D(channels[-1], channels[-1], time_dim), transformers(channels[-1])])
            for _ in range(num_mid_blocks)])
        ups = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(ups) - 1):
            last = i == len(ups) - 2
            self.up_blocks.append(UNetStage([
                CausalResnetBlock1D(ups[i] * 2, ups[i + 1], time_dim), transformers(ups[i + 1]),
                CausalConv1d(ups[i + 1], ups[i + 1], 3) if last else Upsample1D(ups[i + 1])]))
        self.final_block = CausalBlock1D(ups[-1], ups[-1])
        self.final_proj = nn.Conv1d(ups[-1], out_channels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # the official init; matters only for randomly initialised (generated) models
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _attend(self, stage: UNetStage, x: torch.Tensor, mask: torch.Tensor, streaming: bool) -> torch.Tensor:
        """Run a stage's transformer blocks on (B, C, T) x with the (B, 1, T) frame mask."""
        chunk = self.static_chunk_size if streaming else 0
        bias = mask_to_bias(attention_mask(mask.bool(), chunk), x.dtype).unsqueeze(1)  # (B, 1, T|1, T)
        h = x.transpose(1, 2).contiguous()
        for block in stage.transformers:
            h = block(h, bias)
        return h.transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                streaming: bool = False) -> torch.Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T) in x's dtype; t (B,); spks (B, 80)."""
        t_emb = self.time_mlp(sinusoidal_time_embedding(t, self.in_channels))
        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        if cond is not None:
            parts.append(cond)
        x = torch.cat(parts, dim=1)

        skips, masks = [], [mask]
        for stage in self.down_blocks:
            m = masks[-1]
            x = self._attend(stage, stage.resnet(x, m, t_emb), m, streaming)
            skips.append(x)
            x = stage.resample(x * m)
            masks.append(m[:, :, ::2])
        masks.pop()
        m = masks[-1]
        for stage in self.mid_blocks:
            x = self._attend(stage, stage.resnet(x, m, t_emb), m, streaming)
        for stage in self.up_blocks:
            m = masks.pop()
            skip = skips.pop()
            x = torch.cat([x[:, :, :skip.size(-1)], skip], dim=1)
            x = self._attend(stage, stage.resnet(x, m, t_emb), m, streaming)
            x = stage.resample(x * m)
        x = self.final_block(x, m)
        return self.final_proj(x * m) * mask
