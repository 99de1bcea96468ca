"""SwiGLU's activation on the fused gate/up projection: silu(gate) * up in one pass (the engine's
MLP would otherwise launch a silu and a multiply). Rounds like the reference: silu computed in
fp32 and rounded to the input dtype, then the product rounded once."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from light_tts.kernels._checks import FLOAT_DTYPES, check, check_last_contiguous, check_rank


@triton.jit
def _silu_mul_kernel(GU, Out, stride_gn, stride_on, I, BLOCK: tl.constexpr):
    # Grid: (rows, blocks of the intermediate dim).
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(GU + row * stride_gn + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gn + I + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(GU.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_on + offs, (act * u).to(Out.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (gate first, then up; rows may be strided) -> silu(gate) * up [N, I]."""
    check_rank("gate_up", gate_up, 2)
    n, two_i = gate_up.shape
    check(two_i % 2 == 0, f"gate_up must have an even last dim, got {two_i}")
    check(gate_up.dtype in FLOAT_DTYPES, f"gate_up must be a float tensor, got {gate_up.dtype}")
    check_last_contiguous("gate_up", gate_up)
    i = two_i // 2
    out = torch.empty((n, i), dtype=gate_up.dtype, device=gate_up.device)
    if n:
        block = min(1024, triton.next_power_of_2(i))
        _silu_mul_kernel[(n, triton.cdiv(i, block))](gate_up, out, gate_up.stride(0), out.stride(0), i,
                                                      BLOCK=block, num_warps=4)
    return out
