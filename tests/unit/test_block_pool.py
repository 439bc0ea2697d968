"""BlockPool and its free queue: LRU order, O(1) removal, ref counts, errors, usage.

Every expected value below is derived by hand from the design (freed blocks go to the tail, new
blocks come from the head), never read back from the code under test.
"""

from __future__ import annotations

import time

import pytest

from folovllm.core.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_block_queue]


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def check_links(pool: BlockPool) -> None:
    """The queue is a consistent doubly linked list, its count matches, and it holds exactly the
    blocks nobody references."""
    walked = list(pool.free_block_queue)
    assert len(walked) == pool.get_num_free_blocks()
    for a, b in zip(walked, walked[1:]):
        assert a.next_free is b and b.prev_free is a
    assert {b.block_id for b in walked} == {b.block_id for b in pool.blocks if b.ref_cnt == 0}
    for b in pool.blocks:
        if b.ref_cnt > 0:
            assert b.prev_free is None and b.next_free is None


# ---- free queue order ------------------------------------------------------------------------

def test_fresh_pool_hands_out_blocks_from_the_head_in_id_order():
    pool = BlockPool(6)
    assert free_ids(pool) == [0, 1, 2, 3, 4, 5]
    got = pool.get_new_blocks(2)
    assert ids(got) == [0, 1]
    assert free_ids(pool) == [2, 3, 4, 5]
    assert ids(pool.get_new_blocks(3)) == [2, 3, 4]
    assert free_ids(pool) == [5]
    check_links(pool)


def test_freed_blocks_go_to_the_tail_in_the_order_given_and_are_reused_last():
    pool = BlockPool(6)
    a = pool.get_new_blocks(3)  # 0 1 2 ; free: 3 4 5
    pool.free_blocks([a[2], a[0]])  # free: 3 4 5 2 0
    assert free_ids(pool) == [3, 4, 5, 2, 0]
    pool.free_blocks([a[1]])  # free: 3 4 5 2 0 1
    assert free_ids(pool) == [3, 4, 5, 2, 0, 1]
    # LRU: the never-used blocks first, then the least recently freed.
    assert ids(pool.get_new_blocks(4)) == [3, 4, 5, 2]
    assert ids(pool.get_new_blocks(2)) == [0, 1]
    assert pool.get_num_free_blocks() == 0
    check_links(pool)


def test_popleft_on_empty_queue_raises():
    q = FreeKVCacheBlockQueue([KVCacheBlock(0)])
    q.popleft()
    with pytest.raises(ValueError):
        q.popleft()
    assert q.num_free_blocks == 0
    assert list(q) == []


# ---- touch: removal from the middle -----------------------------------------------------------

def test_touch_removes_a_free_block_from_the_middle_and_keeps_the_rest_in_order():
    pool = BlockPool(5)
    blocks = pool.blocks
    pool.touch([blocks[2]])
    assert blocks[2].ref_cnt == 1
    assert free_ids(pool) == [0, 1, 3, 4]
    assert pool.get_num_free_blocks() == 4
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    # Head and tail of the queue can be touched too.
    pool.touch([blocks[0], blocks[4]])
    assert free_ids(pool) == [1, 3]
    check_links(pool)
    # The remaining free blocks still come out in order.
    assert ids(pool.get_new_blocks(2)) == [1, 3]
    # A touched block goes back to the tail when released.
    pool.free_blocks([blocks[2]])
    assert free_ids(pool) == [2]
    check_links(pool)


def test_touch_does_not_walk_the_queue(monkeypatch):
    """Removal uses the block's own links: iterating the queue during touch is not allowed."""
    pool = BlockPool(8)

    def no_iter(self):
        raise AssertionError("touch must not walk the free queue")

    monkeypatch.setattr(FreeKVCacheBlockQueue, "__iter__", no_iter)
    pool.touch([pool.blocks[5], pool.blocks[3]])
    monkeypatch.undo()
    assert free_ids(pool) == [0, 1, 2, 4, 6, 7]
    check_links(pool)


def test_touch_from_the_middle_is_constant_time():
    # 200k blocks; 20k removals from the middle.  A linear-time removal would need ~2e9 steps.
    n = 200_000
    pool = BlockPool(n)
    middle = pool.blocks[n // 2 - 10_000: n // 2 + 10_000]
    t0 = time.perf_counter()
    pool.touch(middle)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0
    assert pool.get_num_free_blocks() == n - 20_000
    head = pool.get_new_blocks(1)[0]
    assert head.block_id == 0


# ---- ref counts -------------------------------------------------------------------------------

def test_new_blocks_have_ref_count_one_and_touch_adds_references():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert a.ref_cnt == 1 and b.ref_cnt == 1
    # Touching a held block only adds a reference: the free queue is unchanged.
    pool.touch([a])
    assert a.ref_cnt == 2
    assert free_ids(pool) == [2, 3]
    # First release: still held by someone, not free.
    pool.free_blocks([a])
    assert a.ref_cnt == 1
    assert free_ids(pool) == [2, 3]
    # Second release: free, at the tail.
    pool.free_blocks([a])
    assert a.ref_cnt == 0
    assert free_ids(pool) == [2, 3, 0]
    check_links(pool)


def test_double_free_asserts_and_does_not_corrupt_the_queue():
    pool = BlockPool(3)
    (a,) = pool.get_new_blocks(1)
    pool.free_blocks([a])
    with pytest.raises(AssertionError):
        pool.free_blocks([a])
    assert a.ref_cnt == 0
    assert free_ids(pool) == [1, 2, 0]
    assert pool.get_num_free_blocks() == 3
    check_links(pool)


def test_never_allocated_block_cannot_be_freed():
    pool = BlockPool(2)
    with pytest.raises(AssertionError):
        pool.free_blocks([pool.blocks[1]])
    assert pool.get_num_free_blocks() == 2


# ---- running out ------------------------------------------------------------------------------

def test_get_new_blocks_beyond_free_raises_and_takes_nothing():
    pool = BlockPool(4)
    pool.get_new_blocks(3)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    assert pool.get_num_free_blocks() == 1
    assert free_ids(pool) == [3]
    assert pool.blocks[3].ref_cnt == 0
    assert ids(pool.get_new_blocks(1)) == [3]
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    assert pool.get_new_blocks(0) == []


def test_pool_needs_a_block():
    with pytest.raises(ValueError):
        BlockPool(0)


# ---- usage ------------------------------------------------------------------------------------

def test_usage_tracks_the_fraction_of_blocks_in_use():
    pool = BlockPool(8)
    assert pool.get_usage() == 0.0
    a = pool.get_new_blocks(2)
    assert pool.get_usage() == pytest.approx(0.25)
    b = pool.get_new_blocks(6)
    assert pool.get_usage() == pytest.approx(1.0)
    pool.touch(a)  # shared, not more used
    assert pool.get_usage() == pytest.approx(1.0)
    pool.free_blocks(b)
    assert pool.get_usage() == pytest.approx(0.25)
    pool.free_blocks(a)
    assert pool.get_usage() == pytest.approx(0.25)  # still referenced once
    pool.free_blocks(a)
    assert pool.get_usage() == 0.0
    assert pool.get_num_free_blocks() == 8


# ---- cached hashes ----------------------------------------------------------------------------

def test_cached_block_keeps_its_hash_while_free_and_loses_it_when_reused():
    pool = BlockPool(2, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 111)
    pool.cache_block(b, 222)
    assert pool.get_cached_block(111) is a
    pool.free_blocks([a, b])  # free: a b
    assert pool.get_cached_block(111) is a and a.block_hash == 111
    # A cache hit on a free block: touch takes it out of the queue.
    pool.touch([pool.get_cached_block(222)])
    assert free_ids(pool) == [a.block_id]
    # Reusing `a` for new tokens forgets its hash.
    (again,) = pool.get_new_blocks(1)
    assert again is a
    assert a.block_hash is None
    assert pool.get_cached_block(111) is None
    assert pool.get_cached_block(222) is b


def test_cached_prefix_stops_at_the_first_hash_not_cached():
    pool = BlockPool(4, enable_caching=True)
    a, b, c, _ = pool.get_new_blocks(4)
    for block, h in ((a, 11), (b, 22), (c, 44)):
        pool.cache_block(block, h)
    assert pool.get_cached_prefix([11, 22, 44]) == [a, b, c]
    assert pool.get_cached_prefix([11, 22, 33, 44]) == [a, b]   # 44 is cached, but after a miss
    assert pool.get_cached_prefix([33, 11]) == []
    assert pool.get_cached_prefix([]) == []


def test_first_cached_block_for_a_hash_stays_canonical():
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 5)
    pool.cache_block(b, 5)
    assert pool.get_cached_block(5) is a
    # Evicting the duplicate must not drop the canonical entry.
    pool.free_blocks([b])
    pool.get_new_blocks(2)  # block 2, then b
    assert b.block_hash is None
    assert pool.get_cached_block(5) is a


def test_without_caching_freed_blocks_forget_their_hash():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    a.block_hash = 42
    pool.free_blocks([a])
    assert a.block_hash is None


def test_reset_prefix_cache_only_when_everything_is_free():
    pool = BlockPool(2, enable_caching=True)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, 9)
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(9) is a
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(9) is None
    assert a.block_hash is None
