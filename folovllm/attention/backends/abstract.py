"""The attention backend interface. The runner builds one AttentionMetadata per step; every layer's
backend reads it to write the step's K/V into the paged cache and attend over it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_actual_tokens: int          # rows of q/k/v that are real (the rest is CUDA-graph padding)
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor   # [num_reqs + 1] int32: row offsets of each request's queries
    seq_lens: torch.Tensor          # [num_reqs] int32: context length after this step's tokens
    block_table: torch.Tensor       # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor      # [num_tokens] int64: where each row's K/V goes; -1 = skip
    # Host copies, for backends that loop in Python.
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor


class AttentionImpl:
    """One backend's attention for one layer."""

    # True when forward(..., kv_written=True) is supported: the model already stored this step's
    # K/V at slot_mapping (fused into its rotary kernel), so the backend only attends.
    accepts_written_kv = False

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads

    def decode_graph_bounds(self, num_reqs: int, max_model_len: int, device: torch.device) -> list[int]:
        """The context-length bounds for which a pure-decode CUDA graph of num_reqs requests needs
        its own capture (a backend whose launch depends on the longest context in the batch), in
        increasing order, the last being max_model_len. The runner replays the graph of the
        smallest bound that covers the step's longest context."""
        return [max_model_len]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata, kv_written: bool = False) -> torch.Tensor:
        """query [T, H, D], key/value [T, KVH, D], kv_cache [2, num_blocks, block_size, KVH, D]
        -> [T, H, D]. kv_written: the step's K/V are already in the cache (see accepts_written_kv)."""
        raise NotImplementedError
