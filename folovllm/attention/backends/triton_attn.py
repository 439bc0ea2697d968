"""The Triton backend: one kernel writes this step's K/V into the paged cache, one attends
(folovllm/attention/ops). Nothing here reads device values on the host, and the kernels' grids
depend only on tensor shapes, so a forward pass can be captured in a CUDA graph."""

from __future__ import annotations

import torch

from folovllm.attention.backends.abstract import AttentionImpl, AttentionMetadata
from folovllm.attention.ops.triton_reshape_and_cache import reshape_and_cache
from folovllm.attention.ops.triton_unified_attention import DECODE_SPLIT_MIN_LEN, choose_config, unified_attention


class TritonAttentionImpl(AttentionImpl):
    # The model runner captures decode steps in CUDA graphs only for backends that say so. Padding
    # requests (q_len 1, seq_len 1, slot -1) are attended harmlessly and write nothing. The split
    # path's scratch is allocated by the eager warm-up of each batch size, before capture.
    supports_cuda_graph = True
    accepts_written_kv = True

    def decode_graph_bounds(self, num_reqs: int, max_model_len: int, device: torch.device) -> list[int]:
        # A large decode batch splits contexts only when one may be long (choose_config): then one
        # graph for batches whose contexts all fit DECODE_SPLIT_MIN_LEN (plain decode) and one for
        # the rest (split), so that short batches do not pay for the split.
        if max_model_len <= DECODE_SPLIT_MIN_LEN:
            return [max_model_len]
        short = choose_config(num_reqs, self.num_kv_heads, 1, device, DECODE_SPLIT_MIN_LEN)
        long = choose_config(num_reqs, self.num_kv_heads, 1, device, max_model_len)
        return [max_model_len] if short == long else [DECODE_SPLIT_MIN_LEN, max_model_len]

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
                          self.scale, max_query_len=md.max_query_len, max_seq_len=md.max_seq_len)
        return out
