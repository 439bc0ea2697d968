"""Write this step's K/V rows into the paged cache.

One program per token row copies all of that token's KV heads (KVH * head_dim contiguous values)
for K and for V. A slot of -1 marks a row that must not be written (CUDA-graph padding), so the
grid can cover every row of the (padded) batch and still be replayed safely.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    if slot < 0:
        return
    # Block shapes must be powers of two: pad heads and head_dim, mask the padding.
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM)
    k = tl.load(key_ptr + row * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(value_ptr + row * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    # int64 slot: num_blocks * block_size * KVH * D can pass 2^31 on a large cache.
    dst = slot * stride_cs + offs_h * stride_ch + offs_d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """key/value [T, KVH, D] -> kv_cache [2, num_blocks, block_size, KVH, D] at slot_mapping[t]
    (= block_id * block_size + offset); rows with slot -1, and rows past len(slot_mapping), are
    skipped. The grid depends only on tensor shapes, so this is safe inside a CUDA graph."""
    num_rows = min(key.shape[0], slot_mapping.shape[0])
    if num_rows == 0:
        return
    _, _, _, num_kv_heads, head_dim = kv_cache.shape
    assert key.shape[1:] == value.shape[1:] == (num_kv_heads, head_dim)
    assert key.stride(2) == 1 and value.stride(2) == 1, "head_dim must be contiguous"
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    # A slot indexes the flattened (block, offset) pair: it needs those two dims to be dense.
    assert k_cache.stride(1) * k_cache.shape[1] == k_cache.stride(0) and k_cache.stride(3) == 1
    _reshape_and_cache_kernel[(num_rows,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )
