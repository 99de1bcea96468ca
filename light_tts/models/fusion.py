"""Linear projections of the same input fused into one GEMM, without a second copy of the weights."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


@torch.no_grad()
def fuse_linears(projs: Sequence[nn.Linear]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One weight (and bias, if they have one) for `projs`, stacked by output. The modules' own
    parameters become views of it, so the model holds each weight once and the unfused modules
    and the fused GEMM read the same memory. Call it after the weights are loaded and cast."""
    weight = torch.cat([p.weight for p in projs], dim=0).contiguous()
    bias = torch.cat([p.bias for p in projs], dim=0).contiguous() if projs[0].bias is not None else None
    row = 0
    for p in projs:
        n = p.weight.shape[0]
        p.weight.data = weight[row:row + n]
        if bias is not None:
            p.bias.data = bias[row:row + n]
        row += n
    return weight, bias
