"""Rotary position embedding with a cos/sin table indexed by position.

The inverse frequencies come from transformers' own rope functions, so every rope variant a
config can name (default, linear, dynamic, yarn, llama3, ...) means here what it means there.
Rotation is the 'neox' layout HF Llama/Qwen use: the two halves of each head are the pairs.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs in `rope_theta` and
    `rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def compute_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not known to transformers")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """One per model: every layer uses the same table."""

    def __init__(self, config, head_dim: int, max_position: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq, scaling = compute_inv_freq(config, head_dim)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        cache = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)
        # float32 table: positions far out lose precision in bf16; applied in the input dtype.
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, H*D], k [T, KVH*D] -> rotated q, k (same shapes). On CUDA one
        fused Triton kernel rotates both, into new tensors as here (LlamaAttention calls the
        in-place fused_ops.qk_norm_rope itself)."""
        if q.is_cuda:
            from folovllm.model_executor.layers import fused_ops
            return fused_ops.qk_norm_rope(q, k, positions, self.cos_sin_cache, inplace=False)
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        return _rotate(q, cos, sin, self.head_dim), _rotate(k, cos, sin, self.head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    shape, dtype = x.shape, x.dtype
    x = x.view(shape[0], -1, head_dim).float()
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(dtype).view(shape)
