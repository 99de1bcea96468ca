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
from torch.nn import functional as F

from .cfm import CausalConditionalCFM
from .dit import DiT
from .encoder import PreLookaheadLayer as _SquarePreLookahead
from .flow import N_TIMESTEPS, _numbers
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


class CausalMaskedDiffWithDiT(nn.Module):
    def __init__(self, pre_lookahead_layer: nn.Module, decoder: nn.Module, input_size: int = 80,
                 output_size: int = 80, spk_embed_dim: int = 192, output_type: str = "mel",
                 vocab_size: int = 6561, input_frame_rate: int = 25, only_mask_loss: bool = True,
                 token_mel_ratio: int = 2, pre_lookahead_len: int = 3, **unused):
        super().__init__()
        self.input_size, self.output_size, self.vocab_size = input_size, output_size, vocab_size
        self.output_type, self.input_frame_rate = output_type, input_frame_rate
        self.token_mel_ratio, self.pre_lookahead_len = token_mel_ratio, pre_lookahead_len
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.pre_lookahead_layer = pre_lookahead_layer
        self.decoder = decoder

    @property
    def dtype(self) -> torch.dtype:
        return self.spk_embed_affine_layer.weight.dtype

    def embed_tokens(self, token: torch.Tensor, token_len: torch.Tensor) -> torch.Tensor:
        """(B, T) ids (negative = padding) -> (B, T, input_size), zero past each length."""
        mask = valid_mask(token_len, token.size(1)).transpose(1, 2).to(self.dtype)
        return self.input_embedding(torch.clamp(token, min=0)) * mask

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, spk_embed_dim) x-vector -> (B, output_size); L2 normalised in fp32."""
        embedding = F.normalize(embedding.float(), dim=1).to(self.dtype)
        return self.spk_embed_affine_layer(embedding)

    def encode(self, token_emb: torch.Tensor, token_len: torch.Tensor, finalize: bool,
               streaming: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of (prompt + new) tokens -> (mu (B, 80, T_mel), frame mask (B, 1, T_mel) bool).

        finalize=False: the last pre_lookahead_len tokens are only look-ahead context for the
        tokens before them and yield no frames (they come again in the next call). finalize=True:
        the look-ahead past the end sees zeros. `streaming` changes nothing here (no attention
        before the estimator); it is accepted for the CosyVoice2 signature.
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

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, token_len: torch.Tensor, prompt_token: torch.Tensor,
                  prompt_token_len: torch.Tensor, prompt_feat: torch.Tensor, prompt_feat_len: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool, finalize: bool,
                  n_timesteps: int = N_TIMESTEPS) -> tuple[torch.Tensor, None]:
        """One request (batch 1, like the official; rows of a batch must share lengths).

        token (B, T) new speech tokens; prompt_token (B, Tp); prompt_feat (B, Tf, 80) with
        Tf = token_mel_ratio * Tp; embedding (B, 192). Returns (mel (B, 80, T_new) float32, None):
        the frames after the prompt, token_mel_ratio per new token, minus the look-ahead tokens
        when not finalize. streaming=True makes the estimator's attention chunk-causal.
        """
        spks = self.speaker(embedding)
        tokens = torch.cat([prompt_token, token], dim=1)
        emb = self.embed_tokens(tokens, prompt_token_len + token_len)
        mu, masks = self.encode(emb, prompt_token_len + token_len, finalize, streaming)

        prompt_frames = prompt_feat.size(1)
        cond = torch.zeros_like(mu)
        cond[:, :, :prompt_frames] = prompt_feat.transpose(1, 2).to(mu.dtype)
        mel, _ = self.decoder(mu=mu, mask=masks.to(mu.dtype), spks=spks, cond=cond,
                              n_timesteps=n_timesteps, streaming=streaming)
        return mel[:, :, prompt_frames:].float(), None


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
