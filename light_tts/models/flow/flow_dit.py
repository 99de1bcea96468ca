"""CosyVoice3 flow: speech tokens (+ prompt) -> 80-bin mel at 50 Hz (official CausalMaskedDiffWithDiT).

The same pieces and inference API as the CosyVoice2 flow (light_tts.models.flow.flow), so
token2wav and the plain reference pipeline drive either family:
  embed_tokens    token ids -> masked embeddings (vocab x 80)
  encode          embeddings -> mu (B, 80, T_mel): PreLookaheadLayer, then each token repeated
                  token_mel_ratio times (CosyVoice3 has no conformer encoder and no encoder_proj)
  speaker         x-vector (B, 192) -> (B, 80)
  decoder         CausalConditionalCFM (shared with CosyVoice2: the official CV3 uses the same class
                  and code path) over the DiT estimator (light_tts.models.flow.dit)
State-dict keys equal the official module's, so the official flow.pt loads strictly.
"""
from __future__ import annotations

import torch
from torch import nn

from .cfm import CausalConditionalCFM
from .dit import DiT
from .encoder import PreLookaheadLayer as _SquarePreLookahead
from .flow import MaskedDiffFlow, _numbers
from .masks import valid_mask


class PreLookaheadLayer(_SquarePreLookahead):
    """The official PreLookaheadLayer with separate widths: conv1 in_channels -> channels over the
    token and the next pre_lookahead_len tokens, leaky_relu, causal conv2 (k=3) channels ->
    in_channels, plus the input. The forward (and its context semantics) is the CosyVoice2 one."""

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int = 1):
        super().__init__(in_channels, pre_lookahead_len)
        self.in_channels, self.channels = in_channels, channels
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3)


class CausalMaskedDiffWithDiT(MaskedDiffFlow):
    def __init__(self, pre_lookahead_layer: nn.Module, decoder: nn.Module, input_size: int = 80,
                 output_size: int = 80, spk_embed_dim: int = 192, output_type: str = "mel",
                 vocab_size: int = 6561, input_frame_rate: int = 25, only_mask_loss: bool = True,
                 token_mel_ratio: int = 2, pre_lookahead_len: int = 3, **unused):
        super().__init__(input_size, output_size, spk_embed_dim, output_type, vocab_size, input_frame_rate,
                         token_mel_ratio, pre_lookahead_len)
        self.pre_lookahead_layer = pre_lookahead_layer
        self.decoder = decoder

    @classmethod
    def from_config(cls, cfg) -> "CausalMaskedDiffWithDiT":
        """Built from light_tts.models.config.CosyVoice3Config."""
        return build_dit_flow(cfg.flow, cfg.pre_lookahead, cfg.cfm, cfg.estimator)

    def encode(self, token_emb: torch.Tensor, token_len: torch.Tensor, finalize: bool,
               streaming: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """PreLookaheadLayer, then each token repeated token_mel_ratio times (see MaskedDiffFlow.encode).

        finalize=True: the look-ahead past the end sees zeros. `streaming` changes nothing here (no
        attention before the estimator); it is accepted for the CosyVoice2 signature.
        """
        if finalize:
            h = self.pre_lookahead_layer(token_emb)
        else:
            k = self.pre_lookahead_len
            h = self.pre_lookahead_layer(token_emb[:, :-k], context=token_emb[:, -k:])
            token_len = token_len - k
        h = h.repeat_interleave(self.token_mel_ratio, dim=1)
        masks = valid_mask(token_len * self.token_mel_ratio, h.size(1))
        return h.transpose(1, 2).contiguous(), masks


    def encode_rows(self, ids: torch.Tensor, n: torch.Tensor, lens: torch.Tensor, t: int,
                    streaming: torch.Tensor) -> torch.Tensor:
        """encode for a padded batch of rows (the batched decode engine's RowEncoder): ids (B, W) with
        -1 past each row's n tokens (look-ahead tokens inline after the lens that yield frames)
        -> mu (B, 80, ratio * t), zero past each row's frames. One pre-lookahead call for all rows:
        embed_tokens zeroes every position past n, which is what the look-ahead of a finalised row
        (lens = n) must see, and a streaming row's look-ahead is its own context tokens (n = lens + k)."""
        h = self.pre_lookahead_layer(self.embed_tokens(ids, n))[:, :t]
        h = h.repeat_interleave(self.token_mel_ratio, dim=1)
        masks = valid_mask(lens * self.token_mel_ratio, h.size(1))
        return h.transpose(1, 2) * masks.to(h.dtype)


def build_dit_flow(flow_kwargs: dict, pre_lookahead_kwargs: dict, cfm_kwargs: dict,
                   estimator_kwargs: dict) -> CausalMaskedDiffWithDiT:
    """Build from the yaml's constructor kwargs: flow (without pre_lookahead_layer/decoder),
    pre_lookahead_layer, decoder (cfm_params flattened in, estimator removed), decoder.estimator."""
    flow_kwargs = _numbers(flow_kwargs)
    pre_lookahead_kwargs = _numbers(pre_lookahead_kwargs)
    pre_lookahead_kwargs.setdefault("in_channels", flow_kwargs.get("input_size", 80))
    pre_lookahead_kwargs.setdefault("pre_lookahead_len", flow_kwargs.get("pre_lookahead_len", 3))
    if pre_lookahead_kwargs["pre_lookahead_len"] != flow_kwargs.get("pre_lookahead_len", 3):
        raise ValueError(f"flow.pre_lookahead_len {flow_kwargs.get('pre_lookahead_len', 3)} differs from "
                         f"flow.pre_lookahead_layer.pre_lookahead_len {pre_lookahead_kwargs['pre_lookahead_len']}")
    estimator = DiT(**_numbers(estimator_kwargs))
    cfm = CausalConditionalCFM(estimator=estimator, **_numbers(cfm_kwargs))
    return CausalMaskedDiffWithDiT(PreLookaheadLayer(**pre_lookahead_kwargs), cfm, **flow_kwargs)
