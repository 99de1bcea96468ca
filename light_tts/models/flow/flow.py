"""CosyVoice2 flow: speech tokens (+ prompt) -> 80-bin mel at 50 Hz (official CausalMaskedDiffWithXvec).

Pieces, each callable on its own by a batched decode engine:
  embed_tokens    token ids -> masked embeddings
  encode          embeddings -> mu (B, 80, T_mel) through the upsampling encoder and encoder_proj
  speaker         x-vector (B, 192) -> (B, 80)
  decoder         CausalConditionalCFM: 10 Euler steps with CFG over decoder.estimator
inference() strings them together with the official semantics for one request. MaskedDiffFlow holds
what the CosyVoice3 flow (flow_dit.py) shares: everything but the encoder part.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .cfm import CausalConditionalCFM
from .encoder import UpsampleConformerEncoder
from .estimator import CausalConditionalDecoder
from .masks import make_pad_mask

N_TIMESTEPS = 10


class MaskedDiffFlow(nn.Module):
    """What the flows of both families share (CosyVoice2's below, CosyVoice3's in flow_dit.py): the
    token embedding, the speaker projection and `inference`; a subclass registers its encoder part
    and the decoder after these, in the official order, and defines `encode`."""

    def __init__(self, input_size: int, output_size: int, spk_embed_dim: int, output_type: str, vocab_size: int,
                 input_frame_rate: int, token_mel_ratio: int, pre_lookahead_len: int):
        super().__init__()
        self.input_size, self.output_size, self.vocab_size = input_size, output_size, vocab_size
        self.output_type, self.input_frame_rate = output_type, input_frame_rate
        self.token_mel_ratio, self.pre_lookahead_len = token_mel_ratio, pre_lookahead_len
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.spk_embed_affine_layer.weight.dtype

    def embed_tokens(self, token: torch.Tensor, token_len: torch.Tensor) -> torch.Tensor:
        """(B, T) ids (negative = padding) -> (B, T, input_size), zero past each length."""
        mask = (~make_pad_mask(token_len, token.size(1))).unsqueeze(-1).to(self.dtype)
        return self.input_embedding(torch.clamp(token, min=0)) * mask

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, spk_embed_dim) x-vector -> (B, output_size); L2 normalised in fp32."""
        embedding = F.normalize(embedding.float(), dim=1).to(self.dtype)
        return self.spk_embed_affine_layer(embedding)

    def encode(self, token_emb: torch.Tensor, token_len: torch.Tensor, finalize: bool,
               streaming: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of (prompt + new) tokens -> (mu (B, 80, T_mel), frame mask (B, 1, T_mel) bool).

        finalize=False: the last pre_lookahead_len tokens are only look-ahead context for the
        tokens before them and yield no frames (they come again in the next call).
        """
        raise NotImplementedError

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, token_len: torch.Tensor, prompt_token: torch.Tensor,
                  prompt_token_len: torch.Tensor, prompt_feat: torch.Tensor, prompt_feat_len: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool, finalize: bool,
                  n_timesteps: int = N_TIMESTEPS) -> tuple[torch.Tensor, None]:
        """One request (batch 1, like the official; rows of a batch must share lengths).

        token (B, T) new speech tokens; prompt_token (B, Tp); prompt_feat (B, Tf, 80) with
        Tf = token_mel_ratio * Tp; embedding (B, 192). Returns (mel (B, 80, T_new) float32, None):
        the frames after the prompt, token_mel_ratio per new token, minus the look-ahead tokens
        when not finalize. streaming=True makes the decoder's attention chunk-causal.
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


class CausalMaskedDiffWithXvec(MaskedDiffFlow):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, input_size: int = 512, output_size: int = 80,
                 spk_embed_dim: int = 192, output_type: str = "mel", vocab_size: int = 6561,
                 input_frame_rate: int = 25, only_mask_loss: bool = True, token_mel_ratio: int = 2,
                 pre_lookahead_len: int = 3, **unused):
        super().__init__(input_size, output_size, spk_embed_dim, output_type, vocab_size, input_frame_rate,
                         token_mel_ratio, pre_lookahead_len)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder

    @classmethod
    def from_config(cls, cfg) -> "CausalMaskedDiffWithXvec":
        """Built from light_tts.models.config.CosyVoice2Config."""
        return build_flow(cfg.flow, cfg.encoder, cfg.cfm, cfg.estimator)

    def encode(self, token_emb: torch.Tensor, token_len: torch.Tensor, finalize: bool,
               streaming: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Through the upsampling conformer encoder and encoder_proj (see MaskedDiffFlow.encode)."""
        if finalize:
            h, masks = self.encoder(token_emb, token_len, streaming=streaming)
        else:
            k = self.pre_lookahead_len
            h, masks = self.encoder(token_emb[:, :-k], token_len - k, context=token_emb[:, -k:],
                                    streaming=streaming)
        return self.encoder_proj(h).transpose(1, 2).contiguous(), masks

    def encode_rows(self, ids: torch.Tensor, n: torch.Tensor, lens: torch.Tensor, t: int,
                    streaming: torch.Tensor) -> torch.Tensor:
        """encode for a padded batch of rows (the batched decode engine's RowEncoder): ids (B, W) with
        -1 past each row's n tokens (look-ahead tokens inline after the lens that yield frames),
        streaming (B,) bool -> mu (B, 80, ratio * t), zero past each row's frames."""
        h, masks = self.encoder.forward_rows(self.embed_tokens(ids, n), lens, n, t, streaming)
        return self.encoder_proj(h).transpose(1, 2) * masks.to(h.dtype)


def _numbers(d: dict) -> dict:
    """yaml floats like '1e-06' may arrive as strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, str):
            try:
                v = float(v) if any(c in v for c in ".eE") else int(v)
            except ValueError:
                pass
        out[k] = v
    return out


def build_flow(flow_kwargs: dict, encoder_kwargs: dict, cfm_kwargs: dict,
               estimator_kwargs: dict) -> CausalMaskedDiffWithXvec:
    """Build from the four dicts of light_tts.models.config.CosyVoice2Config
    (cfg.flow, cfg.encoder, cfg.cfm, cfg.estimator)."""
    estimator = CausalConditionalDecoder(**_numbers(estimator_kwargs))
    cfm = CausalConditionalCFM(estimator=estimator, **_numbers(cfm_kwargs))
    flow_kwargs = _numbers(flow_kwargs)
    encoder_kwargs = _numbers(encoder_kwargs)
    # the official encoder hard-codes these; tie them to the flow's values
    encoder_kwargs.setdefault("pre_lookahead_len", flow_kwargs.get("pre_lookahead_len", 3))
    encoder_kwargs.setdefault("upsample_stride", flow_kwargs.get("token_mel_ratio", 2))
    encoder = UpsampleConformerEncoder(**encoder_kwargs)
    return CausalMaskedDiffWithXvec(encoder, cfm, **flow_kwargs)
