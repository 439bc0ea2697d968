from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Hugging Face does. Given a residual it first adds it
    (x + residual becomes the new residual), which is what every decoder layer does next.

    On CUDA one fused Triton kernel does it all; the residual variant then works in place (x
    receives the output, residual the new residual), so callers must use the returned tensors."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:
            from folovllm.model_executor.layers import fused_ops
            if residual is None:
                return fused_ops.rms_norm(x, self.weight, self.eps)
            return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)
