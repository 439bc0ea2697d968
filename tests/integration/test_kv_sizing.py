"""How many KV blocks a CPU engine gets, against the arithmetic done by hand from config.json.

A token's KV is K and V, for every layer and KV head: 2 * num_layers * num_kv_heads * head_dim
elements. cpu_kv_cache_space_gib buys floor(space / (that * dtype size * block_size)) blocks,
capped at what max_num_seqs full-length requests could use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_internals import kv_cache_tensors, num_kv_blocks
from folovllm import LLM

BLOCK_SIZE = 16
MAX_MODEL_LEN = 128
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def bytes_per_block_by_hand(model_dir: str, dtype: str) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * DTYPE_BYTES[dtype]
    return per_token * BLOCK_SIZE


def make(model_dir: str, space_bytes: int, dtype: str = "float32", max_num_seqs: int = 256) -> LLM:
    gib = space_bytes / 2**30  # exact: a power-of-two division of an integer below 2**53
    return LLM(model_dir, device="cpu", dtype=dtype, block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
               max_num_seqs=max_num_seqs, cpu_kv_cache_space_gib=gib)


# qwen3 has head_dim 32 in its config (not hidden_size / heads = 16); llama derives 16. Both have
# 2 layers and 2 KV heads (for 4 query heads): 1024 and 512 bytes a token in float32.
@pytest.mark.parametrize("arch, dtype, expected_bytes_per_block", [
    ("qwen3", "float32", 2 * 2 * 2 * 32 * 4 * 16),
    ("llama", "float32", 2 * 2 * 2 * 16 * 4 * 16),
    ("qwen3", "bfloat16", 2 * 2 * 2 * 32 * 2 * 16),
])
def test_space_decides_the_number_of_blocks(tiny_models, arch, dtype, expected_bytes_per_block):
    path = tiny_models[arch][0]
    per_block = bytes_per_block_by_hand(path, dtype)
    assert per_block == expected_bytes_per_block
    space = 37 * per_block + per_block // 3  # 37 and a third blocks' worth: the floor is 37
    llm = make(path, space, dtype)
    # 37 blocks x 16 tokens >= max_model_len, and far below the cap of 256 x 128 / 16 blocks.
    assert num_kv_blocks(llm) == space // per_block == 37
    caches = kv_cache_tensors(llm)
    assert len(caches) == 2  # one per layer
    assert all(c.shape[:3] == (2, 37, BLOCK_SIZE) for c in caches)
    assert sum(c.numel() * c.element_size() for c in caches) == 37 * per_block <= space


def test_max_num_seqs_caps_the_number_of_blocks(tiny_models):
    """Room for 1000 blocks, but 3 requests of at most 128 tokens never use more than 3 x 8."""
    path = tiny_models["qwen3"][0]
    llm = make(path, 1000 * bytes_per_block_by_hand(path, "float32"), max_num_seqs=3)
    assert num_kv_blocks(llm) == 3 * (MAX_MODEL_LEN // BLOCK_SIZE)


def test_too_little_space_for_one_request_is_a_clear_error(tiny_models):
    """7 blocks x 16 tokens < max_model_len 128: no full-length request could ever run."""
    path = tiny_models["qwen3"][0]
    with pytest.raises(ValueError, match=r"holds 7 blocks x 16 tokens = 112 tokens.*cpu_kv_cache_space_gib"):
        make(path, 7 * bytes_per_block_by_hand(path, "float32") + 100)
