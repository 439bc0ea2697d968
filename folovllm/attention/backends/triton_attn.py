"""The Triton backend: one kernel writes this step's K/V into the paged cache, one attends
(folovllm/attention/ops). Nothing here reads device values on the host, and the kernels' grids
depend only on tensor shapes, so a forward pass can be captured in a CUDA graph."""

from __future__ import annotations

import torch

from folovllm.attention.backends.abstract import AttentionImpl, AttentionMetadata
from folovllm.attention.ops.triton_reshape_and_cache import reshape_and_cache
from folovllm.attention.ops.triton_unified_attention import unified_attention


class TritonAttentionImpl(AttentionImpl):
    # The model runner captures decode steps in CUDA graphs only for backends that say so. Padding
    # requests (q_len 1, seq_len 1, slot -1) are attended harmlessly and write nothing. The split
    # path's scratch is allocated by the eager warm-up of each batch size, before capture.
    supports_cuda_graph = True
    accepts_written_kv = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata, kv_written: bool = False) -> torch.Tensor:
        md = attn_metadata
        # Every row with a slot is written; padding rows carry slot -1 (or have no slot at all)
        # and are skipped in the kernel, so num_actual_tokens is not needed here.
        if not kv_written:
            reshape_and_cache(key, value, kv_cache, md.slot_mapping)
        # Rows past query_start_loc[-1] (CUDA-graph padding) are left unwritten: their output is
        # never used.
        out = torch.empty_like(query)
        unified_attention(query, kv_cache, out, md.query_start_loc, md.seq_lens, md.block_table,
                          self.scale, max_query_len=md.max_query_len)
        return out
