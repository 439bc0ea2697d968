"""The reference backend: plain PyTorch over the paged cache, on any device.

Decode rows (one query each) are batched into one attention call over their gathered context;
every other request (a prompt, or a chunk of one) is attended on its own with a causal mask by
position, so a request's query i at position p sees keys 0..p. What depends only on the step
(which rows write where, which blocks each request reads, the masks) is worked out once per step
in a `_Plan` and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from folovllm.attention.backends.abstract import AttentionImpl, AttentionMetadata


def _write(key, value, kv_cache, rows: torch.Tensor | None, slots: torch.Tensor) -> None:
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    if rows is not None:
        key, value = key[rows], value[rows]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slots] = key
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slots] = value


def gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[R, nb] block ids -> [R, KVH, num_tokens, D]: the first num_tokens slots of each row's blocks."""
    kv = cache[block_ids].flatten(1, 2)[:, :num_tokens]      # [R, S, KVH, D]
    return kv.transpose(1, 2)


@dataclass
class _Prefill:
    start: int
    q_len: int
    seq_len: int
    block_ids: torch.Tensor     # [1, nb]
    mask: torch.Tensor          # [q_len, seq_len] bool, causal by position


@dataclass
class _Plan:
    write_rows: torch.Tensor | None   # None: every row writes
    write_slots: torch.Tensor
    decode_rows: torch.Tensor | None
    decode_block_ids: torch.Tensor | None
    decode_len: int
    decode_mask: torch.Tensor | None  # [R, 1, 1, S]
    prefills: list[_Prefill]


def _plan(md: AttentionMetadata, block_size: int) -> _Plan:
    cached = md.__dict__.get("_torch_plan")
    if cached is not None:
        return cached
    n = md.num_actual_tokens
    slots = md.slot_mapping[:n]
    dev = slots.device
    rows = None
    if bool((slots < 0).any()):
        rows = torch.nonzero(slots >= 0).squeeze(1)
        slots = slots[rows]
    qsl = md.query_start_loc_cpu.tolist()
    seq_lens = md.seq_lens_cpu.tolist()
    decodes = [i for i in range(md.num_reqs) if qsl[i + 1] - qsl[i] == 1]
    decode_rows = decode_block_ids = decode_mask = None
    decode_len = 0
    if decodes:
        idx = torch.tensor(decodes, device=dev)
        decode_rows = md.query_start_loc[idx].long()
        decode_len = max(seq_lens[i] for i in decodes)
        decode_block_ids = md.block_table[idx, :-(-decode_len // block_size)].long()
        decode_mask = (torch.arange(decode_len, device=dev)[None, :]
                       < md.seq_lens[idx][:, None]).view(len(decodes), 1, 1, decode_len)
    prefills = []
    for i in range(md.num_reqs):
        q_len, seq_len = qsl[i + 1] - qsl[i], seq_lens[i]
        if q_len == 1:
            continue
        q_pos = torch.arange(seq_len - q_len, seq_len, device=dev)
        prefills.append(_Prefill(qsl[i], q_len, seq_len,
                                 md.block_table[i:i + 1, :-(-seq_len // block_size)].long(),
                                 torch.arange(seq_len, device=dev)[None, :] <= q_pos[:, None]))
    plan = _Plan(rows, slots, decode_rows, decode_block_ids, decode_len, decode_mask, prefills)
    md.__dict__["_torch_plan"] = plan
    return plan


class TorchAttentionImpl(AttentionImpl):
    def forward(self, query, key, value, kv_cache, attn_metadata: AttentionMetadata, kv_written: bool = False):
        assert not kv_written, "the torch backend writes its own K/V"
        md = attn_metadata
        plan = _plan(md, kv_cache.shape[2])
        n = md.num_actual_tokens
        _write(key[:n], value[:n], kv_cache, plan.write_rows, plan.write_slots)
        gqa = self.num_heads != self.num_kv_heads
        decode_out = None
        if plan.decode_rows is not None:
            k = gather_kv(kv_cache[0], plan.decode_block_ids, plan.decode_len)
            v = gather_kv(kv_cache[1], plan.decode_block_ids, plan.decode_len)
            q = query[plan.decode_rows].unsqueeze(2)                 # [R, H, 1, D]
            decode_out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.decode_mask, scale=self.scale,
                                                        enable_gqa=gqa).squeeze(2)
            if not plan.prefills and len(plan.decode_rows) == query.shape[0]:
                return decode_out  # every row is a decode, in order: no scatter needed

        out = query.new_zeros(query.shape)
        if decode_out is not None:
            out[plan.decode_rows] = decode_out
        for p in plan.prefills:
            k = gather_kv(kv_cache[0], p.block_ids, p.seq_len)
            v = gather_kv(kv_cache[1], p.block_ids, p.seq_len)
            q = query[p.start:p.start + p.q_len].transpose(0, 1).unsqueeze(0)   # [1, H, L, D]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=p.mask, scale=self.scale, enable_gqa=gqa)
            out[p.start:p.start + p.q_len] = o[0].transpose(0, 1)
        return out
