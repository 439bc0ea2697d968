"""The attention layer models call. It owns its slice of the KV cache (bound once the cache is
allocated) and hands q/k/v to the chosen backend.

Head counts are this tensor-parallel rank's (the model divides them before building the layer),
so the runner sizes each layer's cache from `num_kv_heads` and `head_dim` here, never from the
HF config."""

from __future__ import annotations

import torch
from torch import nn

from folovllm.attention.backends.abstract import AttentionImpl, AttentionMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 impl_cls: type[AttentionImpl], prefix: str = "") -> None:
        super().__init__()
        self.layer_name = prefix
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.impl = impl_cls(num_heads, head_dim, scale, num_kv_heads)
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, KVH, D]

    def writes_kv_in_model(self, attn_metadata: AttentionMetadata | None) -> bool:
        """Whether the model should store this step's K/V itself (fused into its rotary kernel)
        and call forward with kv_written=True."""
        return attn_metadata is not None and self.kv_cache is not None and self.impl.accepts_written_kv

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: AttentionMetadata | None, kv_written: bool = False) -> torch.Tensor:
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if attn_metadata is None or self.kv_cache is None:
            # Memory profiling before the cache exists: causal attention over the batch as one
            # sequence costs what a prefill of this size costs.
            # On CUDA it must take a flash kernel, O(T) memory: given 3-D inputs, or enable_gqa,
            # SDPA fell back to the math kernel, which holds [H, T, T] float32 scores (100 GiB
            # for a 40960-token profile; at 8192 tokens 4 GiB or more of KV cache lost).
            # So 4-D inputs, and K/V repeated to every query head.
            gqa = self.num_heads != self.num_kv_heads
            if gqa and q.is_cuda:
                g = self.num_heads // self.num_kv_heads
                k, v, gqa = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), False
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True,
                scale=self.impl.scale, enable_gqa=gqa)[0].transpose(0, 1)
        else:
            o = self.impl.forward(q, k, v, self.kv_cache, attn_metadata, kv_written)
        return o.reshape(num_tokens, self.num_heads * self.head_dim)
