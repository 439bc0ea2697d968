"""The reference backend: plain PyTorch over the paged cache, on any device.

Decode rows (one query each) are batched into one attention call over their gathered context;
every other request (a prompt, or a chunk of one) is attended on its own with a causal mask by
position, so a request's query i at position p sees keys 0..p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from folovllm.attention.backends.abstract import AttentionImpl, AttentionMetadata


def write_to_paged_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slots] = key[:slot_mapping.shape[0]][valid]
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slots] = value[:slot_mapping.shape[0]][valid]


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_reqs, max_blocks] block ids -> [num_reqs, KVH, num_tokens, D] (the first num_tokens
    slots of each request's blocks)."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    blocks = cache[block_table[:, :num_blocks].long()]          # [R, nb, bs, KVH, D]
    kv = blocks.flatten(1, 2)[:, :num_tokens]                   # [R, S, KVH, D]
    return kv.transpose(1, 2)


class TorchAttentionImpl(AttentionImpl):
    def forward(self, query, key, value, kv_cache, attn_metadata: AttentionMetadata):
        md = attn_metadata
        n = md.num_actual_tokens
        write_to_paged_cache(key[:n], value[:n], kv_cache, md.slot_mapping[:n])
        out = torch.zeros_like(query)
        qsl = md.query_start_loc_cpu.tolist()
        seq_lens = md.seq_lens_cpu.tolist()
        query_lens = [qsl[i + 1] - qsl[i] for i in range(md.num_reqs)]
        gqa = self.num_heads != self.num_kv_heads

        decodes = [i for i, q in enumerate(query_lens) if q == 1]
        if decodes:
            idx = torch.tensor(decodes, device=query.device)
            rows = md.query_start_loc[idx].long()
            max_len = max(seq_lens[i] for i in decodes)
            k = gather_kv(kv_cache[0], md.block_table[idx], max_len)
            v = gather_kv(kv_cache[1], md.block_table[idx], max_len)
            mask = (torch.arange(max_len, device=query.device)[None, :]
                    < md.seq_lens[idx][:, None]).view(len(decodes), 1, 1, max_len)
            q = query[rows].unsqueeze(2)                         # [R, H, 1, D]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
            out[rows] = o.squeeze(2)

        for i, q_len in enumerate(query_lens):
            if q_len == 1:
                continue
            seq_len, start = seq_lens[i], qsl[i]
            k = gather_kv(kv_cache[0], md.block_table[i:i + 1], seq_len)
            v = gather_kv(kv_cache[1], md.block_table[i:i + 1], seq_len)
            q = query[start:start + q_len].transpose(0, 1).unsqueeze(0)   # [1, H, L, D]
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
            mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
            out[start:start + q_len] = o[0].transpose(0, 1)
        return out
