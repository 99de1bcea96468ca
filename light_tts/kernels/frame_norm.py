"""frame_norm: the flow estimator's per-frame channel ops in one pass (see reference.frame_norm
for the formula). Every tensor is a logical [B, T, C] view with any strides, so the same kernel
reads the U-Net's (B, C, T) conv outputs (passed as `.transpose(1, 2)`), the transformers'
(B, T, C) rows, and writes either layout. One program holds BLOCK_T frames x all C channels in
registers: the channel reductions (LayerNorm) need the whole frame; fp32 inside, one rounding
to each output's dtype."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from light_tts.kernels._checks import FLOAT_DTYPES, check, check_same_device


@triton.jit
def _frame_norm_kernel(A, D, PRE, S, W, NB, M, P, Y,
                       sab, sat, sac, sdb, sdt, sdc, ssb, sst, ssc, smb, smt, spb, spt, spc, syb, syt, syc,
                       T, C, eps,
                       HAS_DELTA: tl.constexpr, HAS_PRE: tl.constexpr, HAS_SUM: tl.constexpr,
                       HAS_NORM: tl.constexpr, MISH: tl.constexpr, HAS_MASK: tl.constexpr,
                       HAS_POST: tl.constexpr, MASK_END: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_C)
    tm = t < T
    cm = c < C
    m2 = tm[:, None] & cm[None, :]
    t2, c2 = t[:, None], c[None, :]
    s = tl.load(A + b * sab + t2 * sat + c2 * sac, mask=m2, other=0.0).to(tl.float32)
    if HAS_DELTA:
        s += tl.load(D + b * sdb + t2 * sdt + c2 * sdc, mask=m2, other=0.0).to(tl.float32)
    if HAS_PRE:
        s += tl.load(PRE + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_SUM:
        tl.store(S + b * ssb + t2 * sst + c2 * ssc, s.to(S.dtype.element_ty), mask=m2)
    y = s
    if HAS_NORM:
        mean = tl.sum(s, axis=1) / C
        diff = tl.where(m2, s - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / C
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
        w = tl.load(W + c, mask=cm, other=0.0).to(tl.float32)
        nb = tl.load(NB + c, mask=cm, other=0.0).to(tl.float32)
        y = diff * rstd[:, None] * w[None, :] + nb[None, :]
    if MISH:
        # mish(y) = y * tanh(softplus(y)); with n = e^y, tanh(log(1 + n)) = (n^2 + 2n) / (n^2 + 2n + 2).
        # Past y = 20 the ratio is 1 in fp32 (and n^2 would overflow).
        n = tl.exp(tl.minimum(y, 20.0))
        q = n * (n + 2.0)
        y = tl.where(y > 20.0, y, y * q / (q + 2.0))
    if HAS_MASK or MASK_END:
        keep = tl.load(M + b * smb + t * smt, mask=tm, other=0.0).to(tl.float32)[:, None]
    if HAS_MASK:
        y = y * keep
    if HAS_POST:
        y += tl.load(P + b * spb + t2 * spt + c2 * spc, mask=m2, other=0.0).to(tl.float32)
    if MASK_END:
        y = y * keep
    tl.store(Y + b * syb + t2 * syt + c2 * syc, y.to(Y.dtype.element_ty), mask=m2)


def _check_btc(name: str, t: Optional[torch.Tensor], shape: tuple) -> None:
    if t is None:
        return
    check(t.dim() == 3 and tuple(t.shape) == shape, f"{name} must be a [B, T, C] = {list(shape)} view, "
                                                    f"got {tuple(t.shape)}")
    check(t.dtype in FLOAT_DTYPES, f"{name} must be a float tensor, got {t.dtype}")


def _strides(t: Optional[torch.Tensor], n: int) -> tuple:
    return tuple(t.stride()) if t is not None else (0,) * n


def frame_norm(a: torch.Tensor, out: torch.Tensor, *, delta: Optional[torch.Tensor] = None,
               pre_bias: Optional[torch.Tensor] = None, sum_out: Optional[torch.Tensor] = None,
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
               mish: bool = False, mask: Optional[torch.Tensor] = None, post_add: Optional[torch.Tensor] = None,
               mask_end: bool = False) -> torch.Tensor:
    shape = tuple(a.shape)
    for name, t in (("a", a), ("out", out), ("delta", delta), ("sum_out", sum_out), ("post_add", post_add)):
        _check_btc(name, t, shape)
    bsz, frames, c = shape
    for name, v in (("pre_bias", pre_bias), ("weight", weight), ("bias", bias)):
        check(v is None or (v.dim() == 1 and v.numel() == c and v.is_contiguous()), f"{name} must be contiguous [{c}]")
    check((weight is None) == (bias is None), "LayerNorm needs both weight and bias")
    check(mask is not None or not mask_end, "mask_end needs a mask")
    check(mask is None or (tuple(mask.shape) == (bsz, frames) and mask.dtype in FLOAT_DTYPES),
          f"mask must be a float [B, T] = {[bsz, frames]} tensor of 0/1")
    present = [t for t in (a, out, delta, pre_bias, sum_out, weight, bias, mask, post_add) if t is not None]
    check_same_device(**{str(i): t for i, t in enumerate(present)})
    if bsz == 0 or frames == 0:
        return out
    block_c = triton.next_power_of_2(c)
    block_t = max(1, min(triton.next_power_of_2(frames), 4096 // block_c))
    grid = (bsz, triton.cdiv(frames, block_t))
    _frame_norm_kernel[grid](
        a, delta if delta is not None else a, pre_bias if pre_bias is not None else a,
        sum_out if sum_out is not None else a, weight if weight is not None else a, bias if bias is not None else a,
        mask if mask is not None else a, post_add if post_add is not None else a, out,
        *a.stride(), *_strides(delta, 3), *_strides(sum_out, 3), *_strides(mask, 2), *_strides(post_add, 3),
        *out.stride(), frames, c, float(eps),
        HAS_DELTA=delta is not None, HAS_PRE=pre_bias is not None, HAS_SUM=sum_out is not None,
        HAS_NORM=weight is not None, MISH=mish, HAS_MASK=mask is not None and not mask_end,
        HAS_POST=post_add is not None, MASK_END=mask_end, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=4)
    return out
