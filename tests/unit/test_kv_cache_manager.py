"""KVCacheManager: block tables, all-or-nothing allocation, freeing, prefix-cache hits and eviction.

Block counts are ceil(tokens / block_size), worked out by hand for block_size 4.
"""

from __future__ import annotations

import pytest

from folovllm.core.kv_cache_manager import KVCacheManager
from folovllm.request import Request
from folovllm.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=100), arrival_time=0.0)


def free_ids(m: KVCacheManager) -> list[int]:
    return [b.block_id for b in m.block_pool.free_block_queue]


def ref(m: KVCacheManager, block_id: int) -> int:
    return m.block_pool.blocks[block_id].ref_cnt


def compute(r: Request, n: int) -> None:
    """What the scheduler does once allocate_slots succeeds: the tokens count as computed."""
    r.num_computed_tokens += n


# ---- block table growth -----------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens, expected_blocks", [
    (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (12, 3), (13, 4), (16, 4), (17, 5), (40, 10),
])
def test_fresh_request_gets_ceil_tokens_over_block_size_blocks(num_tokens, expected_blocks):
    m = KVCacheManager(num_blocks=10, block_size=BS)
    r = req("a", list(range(num_tokens)))
    new = m.allocate_slots(r, num_tokens)
    assert len(new) == expected_blocks
    assert [b.block_id for b in new] == list(range(expected_blocks))
    assert m.get_block_ids("a") == list(range(expected_blocks))
    assert m.num_free_blocks == 10 - expected_blocks
    assert all(b.ref_cnt == 1 for b in new)


def test_block_table_grows_one_block_at_each_block_boundary_while_decoding():
    m = KVCacheManager(num_blocks=8, block_size=BS)
    r = req("a", [1, 2, 3])
    assert len(m.allocate_slots(r, 3)) == 1
    compute(r, 3)
    # Decode: each step computes the last sampled token.  Tokens computed after the step ->
    # blocks held:  4->1  5->2  6->2  7->2  8->2  9->3  10->3  11->3  12->3  13->4
    expected_total = {4: 1, 5: 2, 6: 2, 7: 2, 8: 2, 9: 3, 10: 3, 11: 3, 12: 3, 13: 4}
    expected_new = {4: 0, 5: 1, 6: 0, 7: 0, 8: 0, 9: 1, 10: 0, 11: 0, 12: 0, 13: 1}
    for n in range(4, 14):
        r.append_output_token_ids([100 + n])
        new = m.allocate_slots(r, 1)
        assert len(new) == expected_new[n], n
        compute(r, 1)
        assert len(m.get_block_ids("a")) == expected_total[n], n
    assert m.get_block_ids("a") == [0, 1, 2, 3]
    assert m.num_free_blocks == 4


def test_chunked_allocation_adds_only_the_missing_blocks():
    m = KVCacheManager(num_blocks=8, block_size=BS)
    r = req("a", list(range(14)))
    # chunks of 5, 5, 4 tokens: computed 5 -> 2 blocks, 10 -> 3 blocks, 14 -> 4 blocks.
    assert len(m.allocate_slots(r, 5)) == 2
    compute(r, 5)
    assert len(m.allocate_slots(r, 5)) == 1
    compute(r, 5)
    assert len(m.allocate_slots(r, 4)) == 1
    compute(r, 4)
    assert m.get_block_ids("a") == [0, 1, 2, 3]


def test_allocate_rejects_zero_tokens():
    m = KVCacheManager(num_blocks=4, block_size=BS)
    with pytest.raises(ValueError):
        m.allocate_slots(req("a", [1]), 0)


# ---- running short ----------------------------------------------------------------------------

def test_allocate_returns_none_and_changes_nothing_when_the_pool_is_short():
    m = KVCacheManager(num_blocks=4, block_size=BS)
    a = req("a", list(range(10)))
    assert len(m.allocate_slots(a, 10)) == 3  # blocks 0 1 2
    compute(a, 10)
    # b needs ceil(5/4) = 2 blocks, 1 is free.
    b = req("b", list(range(5)))
    assert m.allocate_slots(b, 5) is None
    assert m.num_free_blocks == 1
    assert free_ids(m) == [3]
    assert m.get_block_ids("b") == []
    assert "b" not in m.req_to_blocks
    assert m.get_block_ids("a") == [0, 1, 2]
    # a growing from 10 computed tokens by 6 needs ceil(16/4) - 3 = 1 block: fits.
    # Growing by 7 needs ceil(17/4) - 3 = 2 blocks: does not fit, and a keeps its 3 blocks.
    assert m.allocate_slots(a, 7) is None
    assert m.get_block_ids("a") == [0, 1, 2]
    assert m.num_free_blocks == 1
    assert [ref(m, i) for i in range(4)] == [1, 1, 1, 0]
    assert [blk.block_id for blk in m.allocate_slots(a, 6)] == [3]
    assert m.num_free_blocks == 0


# ---- free -------------------------------------------------------------------------------------

def test_free_returns_every_block_tail_first():
    m = KVCacheManager(num_blocks=8, block_size=BS)
    a = req("a", list(range(10)))
    m.allocate_slots(a, 10)  # 0 1 2
    b = req("b", list(range(5)))
    m.allocate_slots(b, 5)  # 3 4
    assert free_ids(m) == [5, 6, 7]
    m.free(a)
    assert free_ids(m) == [5, 6, 7, 2, 1, 0]
    assert m.get_block_ids("a") == []
    assert [ref(m, i) for i in range(3)] == [0, 0, 0]
    m.free(b)
    assert free_ids(m) == [5, 6, 7, 2, 1, 0, 4, 3]
    assert m.num_free_blocks == 8
    assert m.usage == 0.0
    # Freeing a request that holds nothing is harmless.
    m.free(b)
    assert m.num_free_blocks == 8
    # The next request takes the least recently freed blocks.
    c = req("c", list(range(16)))
    assert [blk.block_id for blk in m.allocate_slots(c, 16)] == [5, 6, 7, 2]


# ---- prefix caching ---------------------------------------------------------------------------

PREFIX = [11, 12, 13, 14, 21, 22, 23, 24]  # two full blocks


def test_prefix_hit_shares_two_blocks_and_computes_the_rest():
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    a = req("a", PREFIX + [31, 32])  # 10 tokens: blocks 0 1 2 (2 full)
    hits, n = m.get_computed_blocks(a)
    assert hits == [] and n == 0
    m.allocate_slots(a, 10)
    compute(a, 10)
    assert m.get_block_ids("a") == [0, 1, 2]

    b = req("b", PREFIX + [41, 42, 43])  # 11 tokens, same two first blocks
    hits, n = m.get_computed_blocks(b)
    assert [blk.block_id for blk in hits] == [0, 1]
    assert n == 2 * BS
    # 3 tokens left to compute: ceil(11/4) = 3 blocks in all, 2 are hits -> 1 new.
    new = m.allocate_slots(b, 11 - n, hits)
    assert [blk.block_id for blk in new] == [3]
    assert m.get_block_ids("b") == [0, 1, 3]
    assert [ref(m, i) for i in range(4)] == [2, 2, 1, 1]
    assert m.num_free_blocks == 6

    # Freeing a leaves the shared blocks with b.
    m.free(a)
    assert [ref(m, i) for i in range(4)] == [1, 1, 0, 1]
    assert free_ids(m) == [4, 5, 6, 7, 8, 9, 2]
    m.free(b)
    assert [ref(m, i) for i in range(4)] == [0, 0, 0, 0]
    assert free_ids(m) == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]


def test_prefix_hit_never_covers_the_whole_prompt():
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    a = req("a", PREFIX + [31, 32, 33, 34])  # 12 tokens, 3 full blocks cached
    m.allocate_slots(a, 12)
    compute(a, 12)
    # The same 12 tokens: 3 blocks are cached but the last token must be recomputed -> 2 blocks.
    same = req("same", PREFIX + [31, 32, 33, 34])
    hits, n = m.get_computed_blocks(same)
    assert [blk.block_id for blk in hits] == [0, 1] and n == 8
    # Exactly the two-block prefix (8 tokens): only 1 block can be a hit.
    exact = req("exact", list(PREFIX))
    hits, n = m.get_computed_blocks(exact)
    assert [blk.block_id for blk in hits] == [0] and n == 4
    # Prefix + one token: both blocks.
    plus1 = req("plus1", PREFIX + [31])
    hits, n = m.get_computed_blocks(plus1)
    assert [blk.block_id for blk in hits] == [0, 1] and n == 8
    # A one-block prompt can never hit.
    tiny = req("tiny", PREFIX[:4])
    assert m.get_computed_blocks(tiny) == ([], 0)


def test_prefix_hit_needs_the_whole_prefix_not_just_the_block():
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    a = req("a", PREFIX + [31])
    m.allocate_slots(a, 9)
    compute(a, 9)
    # Same second block, different first block: nothing is reusable.
    other = req("o", [99, 12, 13, 14] + PREFIX[4:] + [31])
    assert m.get_computed_blocks(other) == ([], 0)
    # Same first block, different second one: one block.
    half = req("h", PREFIX[:4] + [21, 22, 23, 99, 31])
    hits, n = m.get_computed_blocks(half)
    assert [blk.block_id for blk in hits] == [0] and n == 4


def test_a_block_hit_requires_the_same_parent_chain():
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    x, y = [1, 1, 1, 1], [2, 2, 2, 2]
    z, w = [3, 3, 3, 3], [4, 4, 4, 4]
    a = req("a", x + y + [9])  # caches x, then y after x
    m.allocate_slots(a, 9)
    compute(a, 9)
    b = req("b", z + w + [9])  # caches z, then w after z
    m.allocate_slots(b, 9)
    compute(b, 9)
    # x then w: x is a hit, but w was only ever cached after z, so the chain stops.
    hits, n = m.get_computed_blocks(req("p", x + w + [9]))
    assert [blk.block_id for blk in hits] == [0] and n == 4
    hits, n = m.get_computed_blocks(req("q", z + w + [9]))
    assert [blk.block_id for blk in hits] == [3, 4] and n == 8


def test_only_blocks_full_of_computed_tokens_are_cached():
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    prompt = PREFIX + [31]  # 9 tokens
    a = req("a", prompt)
    # First chunk of 5 tokens: block 0 is full, block 1 holds one computed token only.
    m.allocate_slots(a, 5)
    compute(a, 5)
    hits, n = m.get_computed_blocks(req("p1", prompt))
    assert [blk.block_id for blk in hits] == [0] and n == 4
    # Second chunk completes block 1.
    m.allocate_slots(a, 4)
    compute(a, 4)
    hits, n = m.get_computed_blocks(req("p2", prompt))
    assert [blk.block_id for blk in hits] == [0, 1] and n == 8


def test_without_caching_nothing_is_ever_a_hit():
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=False)
    a = req("a", PREFIX + [31])
    m.allocate_slots(a, 9)
    compute(a, 9)
    assert m.get_computed_blocks(req("b", PREFIX + [31])) == ([], 0)
    m.free(a)
    assert m.get_computed_blocks(req("c", PREFIX + [31])) == ([], 0)


def test_hit_on_freed_blocks_takes_them_out_of_the_free_queue():
    m = KVCacheManager(num_blocks=6, block_size=BS, enable_caching=True)
    a = req("a", PREFIX + [31])  # blocks 0 1 2
    m.allocate_slots(a, 9)
    compute(a, 9)
    m.free(a)
    assert free_ids(m) == [3, 4, 5, 2, 1, 0]
    b = req("b", PREFIX + [41, 42])
    hits, n = m.get_computed_blocks(b)
    assert [blk.block_id for blk in hits] == [0, 1] and n == 8
    new = m.allocate_slots(b, 2, hits)
    assert [blk.block_id for blk in new] == [3]
    assert m.get_block_ids("b") == [0, 1, 3]
    assert free_ids(m) == [4, 5, 2]
    assert m.num_free_blocks == 3
    assert [ref(m, i) for i in range(6)] == [1, 1, 0, 1, 0, 0]


def test_hits_on_free_blocks_count_against_the_pool_and_failure_changes_nothing():
    m = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=True)
    a = req("a", PREFIX + [31])  # 9 tokens: blocks 0 1 2, blocks 0 1 cached
    m.allocate_slots(a, 9)
    compute(a, 9)
    m.free(a)  # free: 3 2 1 0
    h = req("h", [7])
    m.allocate_slots(h, 1)  # takes block 3; free: 2 1 0
    assert m.get_block_ids("h") == [3]
    f = req("f", PREFIX + [31, 32, 33, 34, 35])  # 13 tokens -> 4 blocks
    hits, n = m.get_computed_blocks(f)
    assert [blk.block_id for blk in hits] == [0, 1] and n == 8
    # 2 hits sitting in the free queue + 2 new blocks = 4 > 3 free.
    assert m.allocate_slots(f, 5, hits) is None
    assert free_ids(m) == [2, 1, 0]
    assert [ref(m, i) for i in range(4)] == [0, 0, 0, 1]
    assert m.get_block_ids("f") == []
    # The cached prefix is still there.
    hits2, n2 = m.get_computed_blocks(req("probe", PREFIX + [31]))
    assert [blk.block_id for blk in hits2] == [0, 1] and n2 == 8


def test_evicted_cached_blocks_are_reused_lru_and_forget_their_hash():
    m = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=True)
    pool = m.block_pool
    a_tokens = PREFIX + [31]  # 9 tokens
    a = req("a", a_tokens)
    m.allocate_slots(a, 9)  # blocks 0 1 2; 0 and 1 full and cached
    compute(a, 9)
    assert pool.blocks[0].block_hash is not None and pool.blocks[1].block_hash is not None
    assert pool.blocks[2].block_hash is None  # partial block
    m.free(a)
    assert free_ids(m) == [3, 2, 1, 0]
    # Freed cached blocks keep their contents until reused.
    hits, _ = m.get_computed_blocks(req("p1", a_tokens + [99]))
    assert [blk.block_id for blk in hits] == [0, 1]

    # e (11 tokens, 3 blocks) takes the least recently freed blocks: 3, then 2, then 1.
    e_tokens = [51, 52, 53, 54, 61, 62, 63, 64, 71, 72, 73]
    e = req("e", e_tokens)
    assert [blk.block_id for blk in m.allocate_slots(e, 11)] == [3, 2, 1]
    compute(e, 11)
    # Block 1 held a's second block: evicted, its hash forgotten. Its new content (e's third,
    # partial, block) is not cacheable.
    assert pool.blocks[1].block_hash is None
    hits, n = m.get_computed_blocks(req("p2", a_tokens + [99]))
    assert [blk.block_id for blk in hits] == [0] and n == 4  # chain stops at block 1
    assert free_ids(m) == [0]

    # e's two full blocks (3 and 2) are now the cache for its prefix.
    hits, n = m.get_computed_blocks(req("p3", e_tokens))
    assert [blk.block_id for blk in hits] == [3, 2] and n == 8

    m.free(e)  # free: 0 1 2 3
    assert free_ids(m) == [0, 1, 2, 3]
    # f = a's prompt again: block 0 is a hit, 2 new blocks come from the head (1, then 2).
    f = req("f", a_tokens)
    hits, n = m.get_computed_blocks(f)
    assert [blk.block_id for blk in hits] == [0] and n == 4
    new = m.allocate_slots(f, 5, hits)
    assert [blk.block_id for blk in new] == [1, 2]
    assert m.get_block_ids("f") == [0, 1, 2]
    compute(f, 5)
    # Block 2 held e's second block: e's prefix now only hits block 3.
    hits, n = m.get_computed_blocks(req("p4", e_tokens))
    assert [blk.block_id for blk in hits] == [3] and n == 4
    # And a's second block is cached again, now in block 1.
    hits, n = m.get_computed_blocks(req("p5", a_tokens + [99]))
    assert [blk.block_id for blk in hits] == [0, 1] and n == 8
    assert [ref(m, i) for i in range(4)] == [1, 1, 1, 0]


def test_decoded_tokens_fill_blocks_that_become_cacheable():
    m = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=True)
    a = req("a", [1, 2, 3, 4, 5, 6])  # 6 prompt tokens
    m.allocate_slots(a, 6)
    compute(a, 6)
    for t in (7, 8):  # two generated tokens complete the second block
        a.append_output_token_ids([t])
        m.allocate_slots(a, 1)
        compute(a, 1)
    a.append_output_token_ids([9])
    hits, n = m.get_computed_blocks(req("b", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert [blk.block_id for blk in hits] == [0, 1] and n == 8
