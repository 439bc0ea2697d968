"""Prefix caching at the block level, beyond test_kv_cache_manager.py: each full block of a request
is hashed and entered in the cache once (a step's cost does not grow with the context), a cache
salt keeps blocks apart, and the hit / query counters that metrics read count what was served.
Block size 4; counts are worked out by hand."""

from __future__ import annotations

from folovllm.config import CacheConfig, SchedulerConfig
from folovllm.core import kv_cache_manager, kv_cache_utils
from folovllm.core.block_pool import BlockPool
from folovllm.core.kv_cache_manager import KVCacheManager
from folovllm.core.sched.output import ModelRunnerOutput
from folovllm.core.sched.scheduler import Scheduler
from folovllm.request import Request
from folovllm.sampling_params import SamplingParams

BS = 4


def make_scheduler(num_blocks: int = 64, budget: int = 64, caching: bool = True) -> Scheduler:
    sc = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)
    sc.finalize(128)
    cc = CacheConfig(block_size=BS, enable_prefix_caching=caching)
    cc.num_gpu_blocks = num_blocks
    return Scheduler(sc, cc)


def step(s: Scheduler, token: int = 7):
    """One step with a runner that samples `token` for every request whose step ends its tokens."""
    out = s.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = [[token] if s.requests[r].num_computed_tokens == s.requests[r].num_tokens else [] for r in ids]
    s.update_from_output(out, ModelRunnerOutput(ids, sampled))
    return out


def test_each_full_block_is_hashed_and_cached_once(monkeypatch):
    """A 6-token prompt decoding 38 tokens fills 11 blocks (44 tokens): 11 hashes and 11 cache
    entries in all, not one walk over every full block each time a block fills (that would be
    1 + 2 + ... + 11 = 66)."""
    num_hashed, num_cached = [0], [0]
    real_extend, real_cache = kv_cache_manager.extend_block_hashes, BlockPool.cache_block

    def counting_extend(hashes, *args):
        before = len(hashes)
        real_extend(hashes, *args)
        num_hashed[0] += len(hashes) - before

    def counting_cache(self, block, block_hash):
        num_cached[0] += 1
        return real_cache(self, block, block_hash)

    monkeypatch.setattr(kv_cache_manager, "extend_block_hashes", counting_extend)
    monkeypatch.setattr(BlockPool, "cache_block", counting_cache)
    s = make_scheduler()
    r = Request("a", [10, 11, 12, 13, 14, 15], SamplingParams(max_tokens=39, ignore_eos=True))
    s.add_request(r)
    while s.has_unfinished_requests():
        step(s)
        if r.num_computed_tokens:
            # Every block full of known tokens is in the cache by now.
            assert num_cached[0] == r.num_computed_tokens // BS == num_hashed[0]
    assert num_cached[0] == num_hashed[0] == 11  # 6 + 38 computed = 44 = 11 x 4 (the 39th is not)


def test_cache_hits_are_not_entered_again(monkeypatch):
    """A request admitted on 2 cached blocks enters only the blocks it fills itself: its
    12-token prompt has 3 full blocks, 2 of them hits, so 1 cache entry (not 3)."""
    entered = []
    real_cache = BlockPool.cache_block
    monkeypatch.setattr(BlockPool, "cache_block", lambda self, b, h: (entered.append(b.block_id), real_cache(self, b, h)))
    m = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    a = Request("a", list(range(40, 49)), SamplingParams())     # 9 tokens: 2 full blocks
    m.allocate_slots(a, 9)
    assert len(entered) == 2
    b = Request("b", list(range(40, 52)), SamplingParams())     # a's 8 tokens + 4 of its own
    hits, num_cached = m.get_computed_blocks(b)
    assert num_cached == 8
    entered.clear()
    new = m.allocate_slots(b, 4, hits)
    assert entered == [new[0].block_id]
    assert m.get_block_ids("b")[:2] == m.get_block_ids("a")[:2]


def test_block_hashes_chain_each_block_on_its_parent():
    """extend_block_hashes gives the chain of hash_block_tokens (each block's hash over its
    parent's, the salt in the first), whether the blocks are hashed at once or a few at a time,
    and leaves a partial block unhashed."""
    tokens = list(range(100, 123))  # 5 full blocks of 4 and 3 tokens over
    parent, chain = None, []
    for i in range(5):
        parent = kv_cache_utils.hash_block_tokens(parent, tokens[4 * i:4 * i + 4], ("s",) if i == 0 else None)
        chain.append(parent)
    at_once: list[int] = []
    kv_cache_utils.extend_block_hashes(at_once, BS, tokens, ("s",))
    in_steps: list[int] = []
    for n in (3, 9, 9, 16, 23):
        kv_cache_utils.extend_block_hashes(in_steps, BS, tokens[:n], ("s",))
    assert at_once == in_steps == chain
    unsalted: list[int] = []
    kv_cache_utils.extend_block_hashes(unsalted, BS, tokens)
    assert unsalted[0] != chain[0] and len(unsalted) == 5


def test_a_cache_salt_keeps_blocks_apart():
    m = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    tokens = list(range(20, 29))  # 9 tokens: 2 full blocks can be hits

    def admit(rid: str, salt: str | None) -> tuple[list[int], int]:
        r = Request(rid, tokens, SamplingParams(), cache_salt=salt)
        hits, num_cached = m.get_computed_blocks(r)
        m.allocate_slots(r, len(tokens) - num_cached, hits)
        r.num_computed_tokens = len(tokens)
        return m.get_block_ids(rid), num_cached

    a_blocks, _ = admit("a", "tenant-a")
    same, n_same = admit("a2", "tenant-a")
    other, n_other = admit("b", "tenant-b")
    unsalted, n_unsalted = admit("c", None)
    assert n_same == 8 and same[:2] == a_blocks[:2] and same[2] != a_blocks[2]
    assert n_other == 0 and n_unsalted == 0
    assert not set(other) & set(a_blocks) and not set(unsalted) & (set(a_blocks) | set(other))
    assert admit("c2", None)[1] == 8  # the unsalted prompt shares with its own kind


def test_hit_and_query_counters_count_prompt_tokens_at_admission():
    """Queries count each admitted prompt's tokens once (not each step it waits), hits the
    tokens served: A (10 tokens) misses; B shares A's 2 full blocks; C, a 12-token prompt equal
    to A's 10 tokens + 2, also hits only those 2 (its 3rd block was A's partial one)."""
    s = make_scheduler(budget=10)
    kv = s.kv_cache_manager
    prefix = [11, 12, 13, 14, 21, 22, 23, 24]
    s.add_request(Request("A", prefix + [31, 32], SamplingParams(max_tokens=3)))
    s.add_request(Request("B", prefix + [41], SamplingParams(max_tokens=3)))
    step(s)  # A takes the whole budget; B waits and is not counted yet
    assert (kv.num_cached_queries, kv.num_cached_hits) == (10, 0)
    step(s)  # B admitted: 9 tokens asked, 8 served
    assert (kv.num_cached_queries, kv.num_cached_hits) == (19, 8)
    s.add_request(Request("C", prefix + [31, 32, 33, 34], SamplingParams(max_tokens=3)))
    step(s)
    assert (kv.num_cached_queries, kv.num_cached_hits) == (31, 16)
    while s.has_unfinished_requests():
        step(s)
    assert kv.num_free_blocks == 64 and all(b.ref_cnt == 0 for b in kv.block_pool.blocks)


def test_without_caching_the_counters_stay_at_zero():
    s = make_scheduler(caching=False)
    s.add_request(Request("A", list(range(30, 40)), SamplingParams(max_tokens=2)))
    s.add_request(Request("B", list(range(30, 40)), SamplingParams(max_tokens=2)))
    while s.has_unfinished_requests():
        step(s)
    kv = s.kv_cache_manager
    assert (kv.num_cached_queries, kv.num_cached_hits) == (0, 0)
    assert kv.num_free_blocks == 64
