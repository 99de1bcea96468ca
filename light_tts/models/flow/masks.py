"""Boolean masks shared by the flow encoder and the estimator.

Convention: `True` means "may be attended / is a real frame". Every mask keeps the
batch dimension so padded batches work; for batch 1 with no padding all of them
reduce to the official CosyVoice2 masks exactly.
"""
from __future__ import annotations

import torch


def make_pad_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on PADDED positions (official convention)."""
    max_len = max_len if max_len > 0 else int(lengths.max().item())
    positions = torch.arange(max_len, dtype=torch.int64, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(-1)


def valid_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """(B,) lengths -> (B, 1, max_len) bool, True on real frames."""
    return (~make_pad_mask(lengths, max_len)).unsqueeze(1)


def chunk_causal_mask(size: int, chunk_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(size, size) bool: frame i sees every frame up to the end of its own chunk.

    All left chunks stay visible (the official `num_decoding_left_chunks=-1`; the
    official helper ignores the left-chunk count anyway).
    """
    pos = torch.arange(size, device=device)
    chunk_end = (pos // chunk_size + 1) * chunk_size
    return pos.unsqueeze(0) < chunk_end.unsqueeze(1)


def attention_mask(pad_mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Combine a (B, 1, T) frame mask with an optional static chunk mask.

    chunk_size <= 0: returns the key mask (B, 1, T) that broadcasts over queries.
    chunk_size > 0:  returns (B, T, T) = key mask & chunk-causal mask.
    A query row that would see nothing is opened fully, as the official
    `add_optional_chunk_mask` does (such rows are padding and get masked later);
    done with tensor ops so no device sync is needed.
    """
    mask = pad_mask
    if chunk_size > 0:
        mask = pad_mask & chunk_causal_mask(pad_mask.size(-1), chunk_size, pad_mask.device).unsqueeze(0)
    return mask | ~mask.any(dim=-1, keepdim=True)


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive bias: 0 where visible, -1e10 where hidden (official value; -inf in fp16)."""
    return (1.0 - mask.to(dtype)) * -1.0e10


def row_attention_mask(pad_mask: torch.Tensor, chunk_size: int, streaming) -> torch.Tensor:
    """attention_mask with the chunk mask chosen per row: streaming is a bool (all rows) or a (B,)
    bool tensor (rows of a decode batch mix streaming chunks and full-attention final chunks).
    With a tensor the result is (B, T, T)."""
    if isinstance(streaming, bool):
        return attention_mask(pad_mask, chunk_size if streaming else 0)
    t = pad_mask.size(-1)
    full = attention_mask(pad_mask, 0).expand(-1, t, -1)
    if chunk_size <= 0:
        return full
    return torch.where(streaming.view(-1, 1, 1), attention_mask(pad_mask, chunk_size), full)
