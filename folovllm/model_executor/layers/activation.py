from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """[..., 2d] -> silu(first half) * second half: the gated MLP on a merged gate_up output.
    One fused Triton kernel on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from folovllm.model_executor.layers import fused_ops
            return fused_ops.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
