"""Qwen2 decoder body in plain PyTorch (no `transformers` at runtime).

The module tree and parameter names follow `transformers`' Qwen2ForCausalLM so that the
official CosyVoice2 `llm.pt` (keys `llm.model.model.layers.N...`, `llm.model.lm_head.weight`)
loads unchanged:

    Qwen2ForCausalLM
      model: Qwen2Model
        embed_tokens                      Embedding(vocab, hidden)
        layers.N.self_attn.{q,k,v}_proj   Linear with bias
        layers.N.self_attn.o_proj         Linear without bias
        layers.N.mlp.{gate,up,down}_proj  Linear without bias (SwiGLU)
        layers.N.{input,post_attention}_layernorm   RMSNorm
        norm                              RMSNorm
      lm_head                             Linear(hidden, vocab), tied to embed_tokens

Numerics mirror the reference implementation: RMSNorm is computed in fp32 and cast back
before the weight multiply; RoPE angles are computed in fp32 and cast to the activation
dtype; attention softmax accumulates in fp32 (SDPA does this internally). No sliding
window: CosyVoice2's config has `use_sliding_window: false` and sequences are far shorter
than its window anyway.

This is the reference (CPU / test) path; the serving engine may swap attention and the
cache for kernels over a token-slot pool, but must produce the same logits.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from light_tts.models.config import Qwen2Config

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}


class KVCache:
    """Per-layer key/value tensors for a batch of equal-length sequences.

    Storage is preallocated and grown by doubling, so appending one token per decode step
    costs O(1) amortised copies instead of re-concatenating the whole history each step.
    Shapes: (batch, num_kv_heads, capacity, head_dim); only [:, :, :seq_len] is valid.
    """

    def __init__(self, num_layers: int, initial_capacity: int = 256):
        self.num_layers = num_layers
        self.initial_capacity = max(1, initial_capacity)
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self.seq_len = 0  # tokens already stored (identical for every layer after a forward)

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v of the new tokens at positions [seq_len, seq_len + T) and return the
        valid history (views) including them. `seq_len` is advanced by the caller (the
        model) once every layer has appended, so all layers see the same start offset."""
        start, new = self.seq_len, k.shape[2]
        end = start + new
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        if buf_k is None or buf_k.shape[2] < end:
            capacity = max(self.initial_capacity, end, 2 * (buf_k.shape[2] if buf_k is not None else 0))
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            grown_k = k.new_empty(shape)
            grown_v = v.new_empty(shape)
            if buf_k is not None and start > 0:
                grown_k[:, :, :start] = buf_k[:, :, :start]
                grown_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer_idx], self.values[layer_idx] = buf_k, buf_v = grown_k, grown_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called by the model after every layer appended `num_tokens` tokens."""
        self.seq_len += num_tokens


class BatchKVCache:
    """Per-layer key/value tensors for a batch of sequences of DIFFERENT lengths (batched decode).

    Storage per layer is (row_capacity, num_kv_heads, capacity, head_dim), zero-filled past each
    row's length (never uninitialised memory: a NaN there would leak through the masked softmax
    as NaN * 0). Rows [0, num_rows) are the live sequences; `remove_row` moves the last row into
    the hole, so a decode batch is always a prefix of the storage (a view, no gather).

    A sequence enters by copying a prefilled single-sequence `KVCache` (`add_row`). A decode step
    then feeds exactly one token per live row: `decode_layout()` gives each row its own position
    and a key mask, and the model (called with those as `positions` / `attention_mask`) appends
    each row's key/value at that row's own length. Both grow by doubling.
    """

    def __init__(self, num_layers: int, initial_rows: int = 4, initial_capacity: int = 256):
        self.num_layers = num_layers
        self.initial_rows = max(1, initial_rows)
        self.initial_capacity = max(1, initial_capacity)
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self.lengths: list[int] = []                 # valid tokens per live row
        self._step_lengths: Optional[torch.Tensor] = None  # lengths as a tensor during one step

    @property
    def num_rows(self) -> int:
        return len(self.lengths)

    def tokens(self) -> int:
        return sum(self.lengths)

    def _reserve(self, rows: int, length: int, like: torch.Tensor) -> None:
        """Make every layer's storage hold `rows` rows of `length` tokens (like: a (B, H, T, D) k)."""
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None and buf.shape[0] >= rows and buf.shape[2] >= length:
                    continue
                old_rows, old_len = (buf.shape[0], buf.shape[2]) if buf is not None else (0, 0)
                new_rows = max(self.initial_rows, rows, 2 * old_rows if rows > old_rows else old_rows)
                new_len = max(self.initial_capacity, length, 2 * old_len if length > old_len else old_len)
                grown = like.new_zeros((new_rows, like.shape[1], new_len, like.shape[3]))
                if buf is not None:
                    grown[:old_rows, :, :old_len] = buf
                store[i] = grown

    def add_row(self, src: KVCache, src_row: int = 0) -> int:
        """Copy row `src_row` of a prefilled KVCache in as a new live row; returns its index."""
        n = src.seq_len
        row = self.num_rows
        self._reserve(row + 1, n, src.keys[0])
        for i in range(self.num_layers):
            self.keys[i][row, :, :n] = src.keys[i][src_row, :, :n]
            self.values[i][row, :, :n] = src.values[i][src_row, :, :n]
            # A row reused from an earlier, longer sequence keeps stale (finite) values past n:
            # masked out, harmless.
        self.lengths.append(n)
        return row

    def remove_row(self, row: int) -> Optional[int]:
        """Free `row`. Returns the index of the row moved into its place (the old last row),
        or None when `row` was the last one."""
        last = self.num_rows - 1
        moved = None
        if row != last:
            for store in (self.keys, self.values):
                for buf in store:
                    buf[row, :, :self.lengths[last]] = buf[last, :, :self.lengths[last]]
            self.lengths[row] = self.lengths[last]
            moved = last
        self.lengths.pop()
        return moved

    def decode_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions (B, 1), attention_mask (B, 1, 1, S)) for one new token per live row, where
        S = longest row + 1; the mask lets row b see its own keys [0, lengths[b]] only."""
        if not self.num_rows:
            raise ValueError("BatchKVCache.decode_layout: no live rows")
        like = self.keys[0]
        span = max(self.lengths) + 1
        self._reserve(self.num_rows, span, like)
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=like.device)
        self._step_lengths = lengths
        mask = torch.arange(span, device=like.device)[None, :] <= lengths[:, None]
        return lengths[:, None], mask[:, None, None, :]

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (num_rows, H, 1, D), written at each row's own length; returns the keys/values
        of every live row up to the longest row + 1 (views; the mask hides each row's padding)."""
        rows, new = k.shape[0], k.shape[2]
        if rows != self.num_rows or new != 1 or self._step_lengths is None:
            raise ValueError(f"BatchKVCache.append: expected one token for each of {self.num_rows} rows "
                             f"after decode_layout(), got k of shape {tuple(k.shape)}")
        lengths = self._step_lengths
        idx = torch.arange(rows, device=k.device)
        self.keys[layer_idx][idx, :, lengths] = k[:, :, 0]
        self.values[layer_idx][idx, :, lengths] = v[:, :, 0]
        span = max(self.lengths) + 1
        return self.keys[layer_idx][:rows, :, :span], self.values[layer_idx][:rows, :, :span]

    def advance(self, num_tokens: int) -> None:
        if num_tokens != 1:
            raise ValueError("BatchKVCache decodes one token per row per step")
        self.lengths = [n + 1 for n in self.lengths]
        self._step_lengths = None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before scaling, as the reference does, so bf16 results match it.
        return self.weight * x32.to(in_dtype)


class RotaryEmbedding(nn.Module):
    """Standard (non-scaled) RoPE on the two halves of each head ("rotate_half" layout).

    The inverse frequencies are recomputed in fp32 on every call instead of living in a
    buffer: `module.to(bfloat16)` would otherwise round them (in fp16 the lowest ones even
    become subnormal), shifting every angle at long positions. They are derived from the
    config, so nothing here belongs in the state dict either.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) or (B, T) int -> cos, sin of shape (..., head_dim) in `dtype` (angles in fp32)."""
        angles = positions.float()[..., None] * self.inv_freq(positions.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D), or (B, 1, T, D) for per-row positions."""
    return x * cos + _rotate_half(x) * sin


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}")
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: "Optional[KVCache | BatchKVCache]", layer_idx: int,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        past = 0
        if attention_mask is not None:
            # Rows of different lengths (BatchKVCache): the mask says which keys each query sees.
            if cache is not None:
                k, v = cache.append(layer_idx, k, v)
        elif cache is not None:
            past = cache.seq_len
            k, v = cache.append(layer_idx, k, v)

        # GQA: each kv head serves num_heads // num_kv_heads query heads (adjacent query heads
        # share a kv head, i.e. repeat_interleave order).
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)

        if attention_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        elif past == 0:
            # Fresh sequence: plain causal attention (lets SDPA pick a fused kernel).
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
        elif seq == 1:
            # One new token attends to the whole history: no mask needed.
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # A chunk appended after a history: query i sits at absolute position past + i.
            total = past + seq
            allowed = torch.arange(total, device=x.device)[None, :] <= (past + torch.arange(seq, device=x.device))[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer_idx, attention_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def new_cache(self, initial_capacity: int = 256) -> KVCache:
        return KVCache(len(self.layers), initial_capacity)

    def forward(self, inputs_embeds: torch.Tensor, cache: "Optional[KVCache | BatchKVCache]" = None,
                positions: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """inputs_embeds: (B, T, hidden), the T tokens following what `cache` holds.

        Returns the final-norm hidden states (B, T, hidden) (what the official code reads as
        `hidden_states[-1]`). With a cache, the new keys/values are appended to it.

        By default every row has `cache.seq_len` tokens before these (a KVCache). For rows of
        different lengths pass `positions` (B, T) and a boolean `attention_mask` (B, 1, T, S),
        True where a query may attend, over the S keys the cache returns after appending:
        `BatchKVCache.decode_layout()` makes both.
        """
        if (positions is None) != (attention_mask is None):
            raise ValueError("pass positions and attention_mask together")
        if positions is None:
            past = cache.seq_len if cache is not None else 0
            positions = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
        cos, sin = self.rotary(positions, inputs_embeds.dtype)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, attention_mask)
        if cache is not None:
            cache.advance(inputs_embeds.shape[1])
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """`.model` (the body) plus `.lm_head`. CosyVoice2 never uses lm_head (it has its own
    speech-token head), but the official state dict carries its weight, so it exists here;
    with `tie_word_embeddings` it is the same Parameter as `model.embed_tokens.weight`."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, inputs_embeds: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Text-vocabulary logits (B, T, vocab); used for checks against `transformers`."""
        return self.lm_head(self.model(inputs_embeds, cache))
