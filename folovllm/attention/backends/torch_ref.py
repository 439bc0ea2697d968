"""The reference backend: plain PyTorch over the paged cache, on any device.

Decode rows (one query each) are batched into one attention call over their gathered context;
every other request (a prompt, or a chunk of one) is attended on its own with a causal mask by
position, so a request's query i at position p sees keys 0..p. What depends only on the step
(which rows write where, which blocks each request reads, the masks) is worked out once per step
in a `_Plan` and shared by all layers.

On a CPU the decode rows skip scaled_dot_product_attention: at one query row its flash kernel
cost ~130 us a layer (2 cores, Qwen2.5-0.5B's 14/2 heads at ~200 tokens), most of a decode step's
time outside the matmuls. Instead one index_select gathers every decode row's K and V by slot
(the slots are worked out once per step) and two float32 batched matmuls and a softmax attend:
~35 us. Slots past a row's context point at its first token's slot, which is always written, and
are masked: no uninitialized cache memory is ever read.
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
    # CPU decode rows: the cache slot of each of their S context positions ([R * S]; a row's
    # positions past its context repeat its first slot), and where those are padding ([R, 1, 1, S],
    # None when every row's context is S long).
    decode_slots: torch.Tensor | None = None
    decode_pad: torch.Tensor | None = None


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
    decode_rows = decode_block_ids = decode_mask = decode_slots = decode_pad = None
    decode_len = 0
    if decodes:
        idx = torch.tensor(decodes, device=dev)
        decode_rows = md.query_start_loc[idx].long()
        decode_len = max(seq_lens[i] for i in decodes)
        decode_block_ids = md.block_table[idx, :-(-decode_len // block_size)].long()
        pos = torch.arange(decode_len, device=dev)
        decode_mask = (pos[None, :] < md.seq_lens[idx][:, None]).view(len(decodes), 1, 1, decode_len)
        if dev.type == "cpu":
            context = decode_block_ids[:, pos // block_size] * block_size + pos % block_size
            if any(seq_lens[i] < decode_len for i in decodes):
                context = torch.where(decode_mask.view(len(decodes), decode_len), context, context[:, :1])
                decode_pad = ~decode_mask
            decode_slots = context.reshape(-1)
    prefills = []
    for i in range(md.num_reqs):
        q_len, seq_len = qsl[i + 1] - qsl[i], seq_lens[i]
        if q_len == 1:
            continue
        q_pos = torch.arange(seq_len - q_len, seq_len, device=dev)
        prefills.append(_Prefill(qsl[i], q_len, seq_len,
                                 md.block_table[i:i + 1, :-(-seq_len // block_size)].long(),
                                 torch.arange(seq_len, device=dev)[None, :] <= q_pos[:, None]))
    plan = _Plan(rows, slots, decode_rows, decode_block_ids, decode_len, decode_mask, prefills, decode_slots,
                 decode_pad)
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
        if plan.decode_slots is not None:
            decode_out = self._decode_by_slots(query, kv_cache, plan)
            if not plan.prefills and len(plan.decode_rows) == query.shape[0]:
                return decode_out
        elif plan.decode_rows is not None:
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

    def _decode_by_slots(self, query: torch.Tensor, kv_cache: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """The decode rows' attention, in float32 (as the flash kernel accumulates), over K and V
        gathered by slot: [R, H, D] in the query's dtype."""
        r, s = len(plan.decode_rows), plan.decode_len
        kvh, d = self.num_kv_heads, self.head_dim
        g = self.num_heads // kvh  # query heads per KV head, next to each other (as enable_gqa)
        kv = kv_cache.view(2, -1, kvh, d).index_select(1, plan.decode_slots).float()  # [2, R * S, KVH, D]
        k = kv[0].view(r, s, kvh, d).permute(0, 2, 3, 1)                             # [R, KVH, D, S]
        v = kv[1].view(r, s, kvh, d).transpose(1, 2)                                 # [R, KVH, S, D]
        q = query if query.shape[0] == r else query[plan.decode_rows]
        scores = torch.matmul(q.float().view(r, kvh, g, d), k).mul_(self.scale)      # [R, KVH, G, S]
        if plan.decode_pad is not None:
            scores.masked_fill_(plan.decode_pad, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v)                                # [R, KVH, G, D]
        return out.view(r, self.num_heads, d).to(query.dtype)
