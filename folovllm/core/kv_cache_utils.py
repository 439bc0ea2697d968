"""Block hashing for prefix caching, and KV-cache sizing."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def hash_block_tokens(parent_block_hash: int | None, block_token_ids: Sequence[int],
                      extra_keys: tuple | None = None) -> int:
    """A block's hash covers its parent's hash, so equal hashes mean equal whole prefixes, not
    just equal blocks. Python's hash of a tuple of ints is stable within a process, which is all
    the cache needs."""
    return hash((parent_block_hash, tuple(block_token_ids), extra_keys))


def extend_block_hashes(hashes: list[int], block_size: int, token_ids: Sequence[int],
                        extra_keys: tuple | None = None) -> None:
    """Extend `hashes` (those of the first len(hashes) full blocks of token_ids), in place, to
    every full block of token_ids. `extra_keys` (a request's cache salt) go into the first block's
    hash, and so, through the chain, into every block's."""
    first = len(hashes) * block_size
    end = len(token_ids) // block_size * block_size
    if end <= first:
        return
    # One tuple of the new tokens, sliced per block (a tuple's slice is a tuple): the same hashes
    # as hash_block_tokens, at half the cost of a list slice and a tuple per block.
    tokens = tuple(token_ids[first:end])
    parent = hashes[-1] if hashes else None
    for start in range(0, end - first, block_size):
        parent = hash((parent, tokens[start:start + block_size], extra_keys if first + start == 0 else None))
        hashes.append(parent)


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V, every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def check_enough_kv_cache(num_blocks: int, block_size: int, max_model_len: int, knob: str) -> None:
    capacity = num_blocks * block_size
    if capacity < max_model_len:
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks x {block_size} tokens = {capacity} tokens, fewer than "
            f"max_model_len ({max_model_len}), so one full-length request could never run; {knob}, "
            f"or lower max_model_len to at most {capacity}")
