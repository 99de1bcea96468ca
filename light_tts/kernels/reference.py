"""Plain-PyTorch references of the engines' kernels (the CPU path and the tests' ground truth).

Every Triton kernel in light_tts/kernels/<name>.py has a function of the same name and signature
here; light_tts.kernels.dispatch picks one of the two. Layout, shared by all of them:

    k_cache, v_cache   [num_slots + 1, Hkv, D]   one layer's pool; the last slot is the padding slot
    req_to_token       int32 [max_reqs, max_req_len]   row r = the slot of each position of request r
    b_req_idx          int32 [B]    the req_to_token row of batch entry b
    b_seq_len          int   [B]    tokens of request b in the pool (decode: including the new one)
    b_start            int   [B]    offset of request b's new tokens in the packed q (prefill)
    b_new_len          int   [B]    new tokens of request b (prefill)
    b_total_len        int   [B]    tokens of request b in the pool after this prefill (history + new)

GQA: query head h reads kv head h // (Hq // Hkv) (repeat_interleave order, as qwen2.py).

Numerics mirror light_tts.models.qwen2 so the engine's CPU path reproduces Qwen2LM.inference:
attention is `F.scaled_dot_product_attention` on exactly the tensors the plain path builds
(fresh prompt: is_causal; one new token: no mask; a chunk after a history: a boolean mask),
RMSNorm normalises in fp32 and casts back before the weight, RoPE works in the input dtype.

Int8 KV: symmetric per token and head, scale = absmax over D / 127 (computed in fp32, stored in
the scale tensor's dtype), q = round(x / scale) clamped to [-127, 127]; an all-zero vector has
scale 0 and codes 0. Attention over int8 KV dequantises to fp32, computes in fp32 and returns
q's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["store_kv", "context_attention", "decode_attention", "rms_norm", "add_rms_norm", "silu_mul", "rotary",
           "store_kv_int8", "decode_attention_int8", "context_attention_int8", "quantize_int8",
           "dequantize_int8", "frame_norm"]


# ---- KV store -----------------------------------------------------------------------------------

def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v: [N, Hkv, D] written to k_cache[slots], v_cache[slots] (slots int64 [N]), in place."""
    k_cache[slots] = k.to(k_cache.dtype)
    v_cache[slots] = v.to(v_cache.dtype)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H, D] -> (codes int8 [N, H, D], scale fp32 [N, H])."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1) / 127.0
    codes = torch.round(x32 / scale.clamp_min(1e-30)[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes int8 [..., H, D], scale [..., H] -> fp32."""
    return codes.float() * scale.float()[..., None]


def store_kv_int8(k: torch.Tensor, v: torch.Tensor, k_cache_i8: torch.Tensor, k_scale: torch.Tensor,
                  v_cache_i8: torch.Tensor, v_scale: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantise k, v [N, Hkv, D] and write codes / scales ([S + 1, Hkv]) at `slots`, in place."""
    for x, cache, scale in ((k, k_cache_i8, k_scale), (v, v_cache_i8, v_scale)):
        codes, s = quantize_int8(x)
        cache[slots] = codes
        scale[slots] = s.to(scale.dtype)


# ---- attention ------------------------------------------------------------------------------------

def _gather(cache: torch.Tensor, req_to_token: torch.Tensor, req: int, n: int) -> torch.Tensor:
    """The first n positions of request row `req` as [n, H, D]."""
    return cache[req_to_token[req, :n].long()]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, sm_scale: float) -> torch.Tensor:
    """q [n, Hq, D] at positions past..past+n-1; k, v [past + n, Hkv, D] -> [n, Hq, D].
    Same SDPA calls as qwen2.Qwen2Attention on a batch of one."""
    n, hq, _ = q.shape
    groups = hq // k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)                    # (1, Hq, n, D)
    kh = k.transpose(0, 1).unsqueeze(0)                    # (1, Hkv, T, D)
    vh = v.transpose(0, 1).unsqueeze(0)
    if groups > 1:
        kh = kh.repeat_interleave(groups, dim=1)
        vh = vh.repeat_interleave(groups, dim=1)
    if past == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=n > 1, scale=sm_scale)
    elif n == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=sm_scale)
    else:
        total = past + n
        allowed = torch.arange(total, device=q.device)[None, :] <= (past + torch.arange(n, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=sm_scale)
    return out[0].transpose(0, 1)                          # (n, Hq, D)


def _lists(*ts: torch.Tensor) -> list:
    return [t.tolist() for t in ts]


def context_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                      b_req_idx: torch.Tensor, b_start: torch.Tensor, b_new_len: torch.Tensor,
                      b_total_len: torch.Tensor, max_new_len: int, sm_scale: float) -> torch.Tensor:
    """Prefill over packed new tokens q [N, Hq, D] (K/V of the new tokens already stored).
    New token i of request b sits at position total - new + i and attends causally to positions
    0..itself, read through req_to_token. Returns o [N, Hq, D]; rows of q that belong to no request
    are left zero."""
    o = torch.zeros_like(q)
    for req, start, new, total in zip(*_lists(b_req_idx, b_start, b_new_len, b_total_len)):
        if new == 0:
            continue
        k = _gather(k_cache, req_to_token, req, total)
        v = _gather(v_cache, req_to_token, req, total)
        o[start:start + new] = _attend(q[start:start + new], k, v, total - new, sm_scale)
    return o


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                     b_req_idx: torch.Tensor, b_seq_len: torch.Tensor, max_len: int, sm_scale: float) -> torch.Tensor:
    """One new token per request: q [B, Hq, D] attends to positions 0..seq_len-1 (its own K/V
    already stored at seq_len - 1). Returns o [B, Hq, D]."""
    o = torch.empty_like(q)
    for b, (req, n) in enumerate(zip(*_lists(b_req_idx, b_seq_len))):
        k = _gather(k_cache, req_to_token, req, n)
        v = _gather(v_cache, req_to_token, req, n)
        o[b:b + 1] = _attend(q[b:b + 1], k, v, n - 1, sm_scale)
    return o


def _attend_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, sm_scale: float) -> torch.Tensor:
    """Attention in fp32 for dequantised K/V; returns q's dtype."""
    return _attend(q.float(), k, v, past, sm_scale).to(q.dtype)


def context_attention_int8(q: torch.Tensor, k_cache_i8: torch.Tensor, k_scale: torch.Tensor, v_cache_i8: torch.Tensor,
                           v_scale: torch.Tensor, req_to_token: torch.Tensor, b_req_idx: torch.Tensor,
                           b_start: torch.Tensor, b_new_len: torch.Tensor, b_total_len: torch.Tensor,
                           max_new_len: int, sm_scale: float) -> torch.Tensor:
    o = torch.zeros_like(q)
    for req, start, new, total in zip(*_lists(b_req_idx, b_start, b_new_len, b_total_len)):
        if new == 0:
            continue
        slots = req_to_token[req, :total].long()
        k = dequantize_int8(k_cache_i8[slots], k_scale[slots])
        v = dequantize_int8(v_cache_i8[slots], v_scale[slots])
        o[start:start + new] = _attend_fp32(q[start:start + new], k, v, total - new, sm_scale)
    return o


def decode_attention_int8(q: torch.Tensor, k_cache_i8: torch.Tensor, k_scale: torch.Tensor, v_cache_i8: torch.Tensor,
                          v_scale: torch.Tensor, req_to_token: torch.Tensor, b_req_idx: torch.Tensor,
                          b_seq_len: torch.Tensor, max_len: int, sm_scale: float) -> torch.Tensor:
    o = torch.empty_like(q)
    for b, (req, n) in enumerate(zip(*_lists(b_req_idx, b_seq_len))):
        slots = req_to_token[req, :n].long()
        k = dequantize_int8(k_cache_i8[slots], k_scale[slots])
        v = dequantize_int8(v_cache_i8[slots], v_scale[slots])
        o[b:b + 1] = _attend_fp32(q[b:b + 1], k, v, n - 1, sm_scale)
    return o


# ---- norm and rotary ------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H] -> weight * (x / rms(x)) with the normalisation in fp32 and the result cast back to
    x's dtype before the weight multiply (qwen2.RMSNorm)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The residual update and the next norm in one: x += delta in place (one rounding to x's
    dtype, as `x = x + delta`), then rms_norm(x). x, delta [N, H]; returns [N, H]."""
    x.add_(delta)
    return rms_norm(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on a fused gate/up projection: gate_up [N, 2I] -> silu(gate) * up [N, I],
    each op rounded to the input dtype (as `act(gate) * up` on separate tensors)."""
    i = gate_up.shape[1] // 2
    return F.silu(gate_up[:, :i]) * gate_up[:, i:]


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [N, Hq, D] and k [N, Hkv, D] in place ("rotate_half" layout, qwen2.apply_rope).
    cos, sin: [N, D / 2] in the activation dtype (angles computed in fp32, then cast): the halves
    of the [N, D] tables qwen2.RotaryEmbedding returns."""
    c = torch.cat((cos, cos), dim=-1)[:, None, :]
    s = torch.cat((sin, sin), dim=-1)[:, None, :]
    for x in (q, k):
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * c + rot * s)


# ---- flow estimator ------------------------------------------------------------------------------

def frame_norm(a: torch.Tensor, out: torch.Tensor, *, delta=None, pre_bias=None, sum_out=None, weight=None,
               bias=None, eps: float = 1e-5, mish: bool = False, mask=None, post_add=None,
               mask_end: bool = False) -> torch.Tensor:
    """The flow estimator's per-frame channel ops, fused (server/decode/fused_estimator.py). Tensors are
    [B, T, C] views (any strides), mask [B, T] of 0/1; computed in fp32, rounded once per output:

        s = a + delta + pre_bias             (the residual add and its pending bias)
        sum_out <- s                          (optional: the updated residual stream)
        y = LayerNorm(s; weight, bias, eps)   (if weight is given; over C)
        y = mish(y)                           (if mish)
        y = y * mask + post_add               (mask_end=False)  or  (y + post_add) * mask  (mask_end=True)
        out <- y;  returns out

    Absent optional terms drop out. The masks are 0/1, so masking in the middle and again at the
    end (the estimator's `block(x) * mask + t_emb`, then `* mask` in the next block) is mask_end."""
    s = a.float()
    if delta is not None:
        s = s + delta.float()
    if pre_bias is not None:
        s = s + pre_bias.float()
    if sum_out is not None:
        sum_out.copy_(s)
    y = s
    if weight is not None:
        y = F.layer_norm(y, (y.size(-1),), weight.float(), bias.float(), eps)
    if mish:
        y = F.mish(y)
    keep = mask.float().unsqueeze(-1) if mask is not None else None
    if keep is not None and not mask_end:
        y = y * keep
    if post_add is not None:
        y = y + post_add.float()
    if keep is not None and mask_end:
        y = y * keep
    return out.copy_(y)


def flow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, streaming: torch.Tensor,
                   prefix_start: torch.Tensor, prefix_len: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   chunk_frames: int, sm_scale: float, *, branch_rows: int, out=None, stream_start=None,
                   stream_len=None, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """The flow estimator's attention over a padded batch with cached prefixes
    (light_tts/kernels/flow_attention.py says the rule): per row, the prefix's keys from the pool
    (the voice's run, then the stream's), the new keys, a boolean mask,
    scaled_dot_product_attention; zeros past each row's length."""
    b, t, h, d = q.shape
    o = torch.zeros_like(q) if out is None else out.zero_()
    for r in range(b):
        n = int(lengths[r])
        if n == 0:
            continue
        br = r // branch_rows
        runs = [(int(prefix_start[r]), int(prefix_len[r]))]
        if stream_start is not None:
            runs.append((int(stream_start[r]), int(stream_len[r])))
        keys = torch.cat([k_pool[s:s + m, br] for s, m in runs] + [k[r, :n]])       # [plen + n, H, D]
        vals = torch.cat([v_pool[s:s + m, br] for s, m in runs] + [v[r, :n]])
        plen = sum(m for _, m in runs)
        pos = plen + torch.arange(n, device=q.device)
        key_pos = torch.arange(plen + n, device=q.device)
        if bool(streaming[r]) and chunk_frames > 0:
            limit = (pos // chunk_frames + 1) * chunk_frames
        else:
            limit = torch.full_like(pos, plen + n)
        visible = key_pos[None, :] < limit[:, None]
        att = F.scaled_dot_product_attention(q[r, :n].transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1),
                                             attn_mask=visible, scale=sm_scale)
        o[r, :n] = att.transpose(0, 1)
    return o
