"""Batched Qwen2 forward over the token-slot KV pool, with the weights of a loaded Qwen2LM.

Two kinds of batch, both packed (no padding):

    prefill  the new tokens of several requests back to back, x [N, hidden]; request b's tokens
             are rows b_start[b] .. b_start[b] + b_new_len[b] and sit at positions
             b_total_len[b] - b_new_len[b] .. b_total_len[b] - 1 (a prefix-cache hit or a resumed
             request has history before them)
    decode   one token per request, x [B, hidden]; request b's token sits at b_seq_len[b] - 1

Per layer: norm (adding the previous layer's MLP output to the residual first: add_rms_norm) ->
q/k/v projections -> rotary (in place) -> store_kv into the pool slots of the new tokens ->
context_attention / decode_attention through req_to_token -> o_proj -> add_rms_norm (the
attention residual) -> SwiGLU MLP, whose output the next layer's norm (or the final norm) adds.
Kernels come from light_tts.kernels.dispatch (Triton on CUDA, the plain-PyTorch reference
elsewhere). The math is qwen2.py's; on a CPU in fp32 the logits equal the plain path's (tests
check token equality). On CUDA the q/k/v projections and the gate/up projections are each fused
into one GEMM (weights concatenated once at start) and silu * up is one kernel: a decode step is
kernel-launch bound at small batches, so every kernel saved per layer counts 24 times.
RoPE cos/sin come from a table of every position (computed once, the same values as per call).

The speech head (llm_decoder) runs on the last new token of each request only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from light_tts.kernels import dispatch as K
from light_tts.models.fusion import fuse_linears
from light_tts.server.llm.mem_manager import KVPool
from light_tts.server.llm.req_manager import ReqManager


class ModelRunner:
    def __init__(self, llm, pool: KVPool, reqs: ReqManager, fuse: Optional[bool] = None):
        """fuse: the fused q/k/v and gate/up GEMMs (default: on CUDA; tests turn them on on a CPU)."""
        self.llm = llm
        self.body = llm.llm.model.model
        cfg = self.body.config
        self.device, self.dtype = llm.device, llm.dtype
        self.pool = pool
        self.reqs = reqs
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = float(cfg.rms_norm_eps)
        self.sm_scale = 1.0 / math.sqrt(self.d)
        self.layers = list(self.body.layers)
        self.fused_qkv: Optional[list] = None
        self.fused_gate_up: Optional[list] = None
        if fuse if fuse is not None else self.device.type == "cuda":
            self.fused_qkv = [fuse_linears((l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj))
                              for l in self.layers]
            if all(l.mlp.act is F.silu for l in self.layers):   # silu_mul is SwiGLU's activation
                self.fused_gate_up = [fuse_linears((l.mlp.gate_proj, l.mlp.up_proj))[0] for l in self.layers]
        self.cos, self.sin = self._rope(torch.arange(reqs.max_req_len, device=self.device))

    # ---- pieces ---------------------------------------------------------------------------------

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, D / 2] in the activation dtype (angles in fp32, as qwen2.RotaryEmbedding)."""
        cos, sin = self.body.rotary(positions, self.dtype)
        half = self.d // 2
        return cos[:, :half].contiguous(), sin[:, :half].contiguous()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]

    def _qkv(self, i: int, attn, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        if self.fused_qkv is None:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            w, b = self.fused_qkv[i]
            q, k, v = F.linear(h, w, b).split((self.hq * self.d, self.hkv * self.d, self.hkv * self.d), dim=-1)
        return q.view(n, self.hq, self.d), k.view(n, self.hkv, self.d), v.view(n, self.hkv, self.d)

    def _mlp(self, i: int, layer, h: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is None:
            return layer.mlp(h)
        return layer.mlp.down_proj(K.silu_mul(F.linear(h, self.fused_gate_up[i])))

    def _norm(self, x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """rms_norm(x), adding the pending residual `delta` to x (in place) first when there is one."""
        if delta is None:
            return K.rms_norm(x, weight, self.eps)
        return K.add_rms_norm(x, delta, weight, self.eps)

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend):
        """-> (x, delta): the residual stream and the last MLP's output, not yet added (head adds it)."""
        n = x.shape[0]
        cos, sin = self.rope(positions)
        delta = None
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = self._norm(x, delta, layer.input_layernorm.weight)
            q, k, v = self._qkv(i, attn, h)
            K.rotary(q, k, cos, sin)
            cache = self.pool.layer(i)
            if self.pool.int8:
                K.store_kv_int8(k, v, cache[0], cache[1], cache[2], cache[3], slots)
            else:
                K.store_kv(k, v, cache[0], cache[1], slots)
            o = attend(q, cache)
            h = self._norm(x, attn.o_proj(o.reshape(n, self.hq * self.d)), layer.post_attention_layernorm.weight)
            delta = self._mlp(i, layer, h)
        return x, delta

    def head(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Last residual add + final norm + speech head on the rows given -> logits [B, V]."""
        return self.llm.llm_decoder(self._norm(x, delta, self.body.norm.weight))

    # ---- prefill ----------------------------------------------------------------------------------

    def prefill(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, b_req_idx: torch.Tensor,
                b_start: torch.Tensor, b_new_len: torch.Tensor, b_total_len: torch.Tensor,
                max_new_len: int) -> torch.Tensor:
        """x [N, hidden] (embeddings of the new tokens), positions [N] long, slots [N] int64 (pool
        slots of the new tokens, already written into req_to_token) and the b_* int32 [B] tensors
        (device) -> logits [B, V] of each request's last new token. x becomes the residual stream:
        it is overwritten (pass a copy to keep it)."""
        r2t = self.reqs.req_to_token

        def attend(q, cache):
            if self.pool.int8:
                return K.context_attention_int8(q, cache[0], cache[1], cache[2], cache[3], r2t, b_req_idx, b_start,
                                                b_new_len, b_total_len, max_new_len, self.sm_scale)
            return K.context_attention(q, cache[0], cache[1], r2t, b_req_idx, b_start, b_new_len, b_total_len,
                                       max_new_len, self.sm_scale)
        x, delta = self._layers(x, positions, slots, attend)
        last = (b_start + b_new_len - 1).long()
        return self.head(x[last], delta[last])

    # ---- decode -------------------------------------------------------------------------------------

    def decode(self, tokens: torch.Tensor, b_req_idx: torch.Tensor, b_seq_len: torch.Tensor,
               slots: torch.Tensor, max_len: int) -> torch.Tensor:
        """One new token per request: tokens [B] long (speech tokens fed back), b_req_idx /
        b_seq_len int32 [B] (length including the new token), slots int64 [B] (where it goes; written
        into req_to_token here) -> logits [B, V]. Graph-capturable when the kernels are."""
        x = F.embedding(tokens, self.llm.speech_embedding.weight)
        positions = (b_seq_len - 1).long()
        r2t = self.reqs.req_to_token
        r2t[b_req_idx.long(), positions] = slots.to(torch.int32)

        def attend(q, cache):
            if self.pool.int8:
                return K.decode_attention_int8(q, cache[0], cache[1], cache[2], cache[3], r2t, b_req_idx, b_seq_len,
                                               max_len, self.sm_scale)
            return K.decode_attention(q, cache[0], cache[1], r2t, b_req_idx, b_seq_len, max_len, self.sm_scale)
        return self.head(*self._layers(x, positions, slots, attend))
