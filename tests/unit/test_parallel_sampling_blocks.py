"""Parallel sampling in the scheduler and the KV cache manager: the n sequences of a request share
its prompt's blocks, the last prompt block is copied before a sibling writes into it, reference
counts fall to zero when they end, and a long random run of submissions, aborts, n > 1 and
preemptions leaks nothing.

The runner here simulates the paged KV memory itself: every slot holds the (token, position) last
written there. Each step it applies SchedulerOutput.copy_blocks, writes the scheduled tokens
through the block table, then checks that every position a request attends to holds that
request's own token. A missing or wrong copy, or a write into a block someone else still reads,
shows up as a foreign token. Block size 4; expected block ids are worked out by hand."""

from __future__ import annotations

import random

import pytest

from folovllm.config import CacheConfig, SchedulerConfig
from folovllm.core.sched.output import ModelRunnerOutput, SchedulerOutput
from folovllm.core.sched.scheduler import Scheduler
from folovllm.engine.parallel_sampling import fan_out
from folovllm.request import Request, RequestStatus
from folovllm.sampling_params import SamplingParams

BS = 4


def make_scheduler(num_blocks: int = 32, budget: int = 32, max_num_seqs: int = 8, caching: bool = False,
                   max_model_len: int = 64) -> Scheduler:
    sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    sc.finalize(max_model_len)
    cc = CacheConfig(block_size=BS, enable_prefix_caching=caching)
    cc.num_gpu_blocks = num_blocks
    return Scheduler(sc, cc)


def children(rid: str, prompt: list[int], n: int, **params) -> list[Request]:
    params.setdefault("max_tokens", 6)
    return fan_out(Request(rid, prompt, SamplingParams(n=n, **params)))


class MemoryRunner:
    """A model runner over simulated KV memory (see the module docstring). Request i's sampled
    tokens come from token_fn(req_id, output index)."""

    def __init__(self, num_blocks: int, token_fn) -> None:
        self.memory: list[tuple[int, int] | None] = [None] * (num_blocks * BS)
        self.token_fn = token_fn
        self.reqs: dict[str, dict] = {}
        self.num_computed_rows = 0

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_req_ids:
            self.reqs.pop(rid, None)
        for nr in out.scheduled_new_reqs:
            self.reqs[nr.req_id] = dict(tokens=list(nr.prompt_token_ids), num_prompt=len(nr.prompt_token_ids),
                                        computed=nr.num_computed_tokens, blocks=list(nr.block_ids))
        for cr in out.scheduled_cached_reqs:
            st = self.reqs[cr.req_id]
            st["blocks"] = list(cr.new_block_ids) if cr.resumed_from_preemption else st["blocks"] + cr.new_block_ids
            st["computed"] = cr.num_computed_tokens
        for src, dst in out.copy_blocks:  # before the forward pass, as the real runner does
            self.memory[dst * BS:(dst + 1) * BS] = self.memory[src * BS:(src + 1) * BS]

        def slot(st, pos):
            return st["blocks"][pos // BS] * BS + pos % BS

        for rid, n in out.num_scheduled_tokens.items():  # every row writes its K/V first ...
            st = self.reqs[rid]
            for pos in range(st["computed"], st["computed"] + n):
                self.memory[slot(st, pos)] = (st["tokens"][pos], pos)
            self.num_computed_rows += n
        req_ids, sampled = [], []
        for rid, n in out.num_scheduled_tokens.items():  # ... then attends over its context
            st = self.reqs[rid]
            st["computed"] += n
            for pos in range(st["computed"]):
                assert self.memory[slot(st, pos)] == (st["tokens"][pos], pos), \
                    f"{rid} reads a foreign KV entry at position {pos}"
            req_ids.append(rid)
            if st["computed"] == len(st["tokens"]):
                tok = self.token_fn(rid, len(st["tokens"]) - st["num_prompt"])
                st["tokens"].append(tok)
                sampled.append([tok])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids, sampled)


def step(s: Scheduler, runner: MemoryRunner) -> SchedulerOutput:
    out = s.schedule()
    s.update_from_output(out, runner.execute(out))
    return out


def blocks(s: Scheduler, rid: str) -> list[int]:
    return s.kv_cache_manager.get_block_ids(rid)


def ref_counts(s: Scheduler, ids) -> list[int]:
    return [s.kv_cache_manager.block_pool.blocks[i].ref_cnt for i in ids]


def distinct_tokens(rid: str, i: int) -> int:
    """Each sequence samples its own tokens, so siblings' contexts differ after the prompt."""
    index = rid.split("_")[0]
    return 100 + 10 * (int(index) if index.isdigit() else 9) + i


def assert_nothing_held(s: Scheduler) -> None:
    kv = s.kv_cache_manager
    assert kv.num_free_blocks == kv.block_pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
    assert kv.req_to_blocks == {} and kv.req_to_block_hashes == {} and kv.num_cached_block == {}
    assert s.requests == {} and not s.running and not s.waiting


@pytest.mark.parametrize("caching", [False, True], ids=["nocache", "prefixcache"])
def test_siblings_share_the_prompt_blocks_and_copy_the_last(caching):
    """A 10-token prompt, n = 3 (blocks 0 1 2, the third holding 2 tokens), and a plain request X
    queued behind it.
    1: "0_p" computes the prompt (10 tokens); its siblings wait for it, and X (5 tokens) is let in
       past them: blocks 3 4.
    2: "1_p" and "2_p" start on 0_p's blocks 0 and 1 and get copies of block 2 (in 5 and 6), each
       computing only its last prompt token. 0_p and X decode.
    The prompt's 10 tokens are computed once: 10 + 5 rows, then 1 + 1 + 1 + 1."""
    s = make_scheduler(caching=caching)
    runner = MemoryRunner(32, distinct_tokens)
    prompt = [11, 12, 13, 14, 21, 22, 23, 24, 31, 32]
    seqs = children("p", prompt, 3)
    for r in seqs + [Request("X", [41, 42, 43, 44, 45], SamplingParams(max_tokens=6))]:
        s.add_request(r)
    out = step(s, runner)
    assert out.num_scheduled_tokens == {"0_p": 10, "X": 5} and out.copy_blocks == []
    assert [r.request_id for r in s.waiting] == ["1_p", "2_p"]
    assert blocks(s, "0_p") == [0, 1, 2] and blocks(s, "X") == [3, 4]
    out = step(s, runner)
    assert out.num_scheduled_tokens == {"0_p": 1, "X": 1, "1_p": 1, "2_p": 1}
    assert out.copy_blocks == [(2, 5), (2, 6)]
    assert blocks(s, "1_p") == [0, 1, 5] and blocks(s, "2_p") == [0, 1, 6]
    assert [(nr.req_id, nr.num_computed_tokens) for nr in out.scheduled_new_reqs] == [("1_p", 9), ("2_p", 9)]
    assert ref_counts(s, [0, 1, 2, 5, 6]) == [3, 3, 1, 1, 1]
    assert runner.num_computed_rows == 15 + 4
    while s.has_unfinished_requests():
        step(s, runner)
    for r in seqs:
        assert r.output_token_ids == [distinct_tokens(r.request_id, j) for j in range(6)]
    step(s, runner)
    assert_nothing_held(s)


def test_waiting_siblings_keep_their_rows():
    """max_num_seqs 3: the n = 3 request's first sequence runs and its two siblings wait for its
    prompt; X, behind them, is not let into the rows they will take."""
    s = make_scheduler(max_num_seqs=3)
    runner = MemoryRunner(32, distinct_tokens)
    for r in children("p", list(range(10, 20)), 3) + [Request("X", [41, 42], SamplingParams(max_tokens=2))]:
        s.add_request(r)
    assert step(s, runner).num_scheduled_tokens == {"0_p": 10}
    assert step(s, runner).num_scheduled_tokens == {"0_p": 1, "1_p": 1, "2_p": 1}
    assert [r.request_id for r in s.waiting] == ["X"]
    while s.has_unfinished_requests():
        step(s, runner)
    step(s, runner)
    assert_nothing_held(s)


def test_a_prompt_of_whole_blocks_copies_its_last_full_block():
    """An 8-token prompt fills blocks 0 and 1; the sibling recomputes token 7, which lives in
    block 1, so block 1 is copied and only block 0 is shared. In step 2 the running 0_q comes
    first and takes block 2 for its 9th token, so the copy goes to block 3; 1_q's 9th token, a
    step later, gets block 4."""
    s = make_scheduler()
    runner = MemoryRunner(32, distinct_tokens)
    for r in children("q", [1, 2, 3, 4, 5, 6, 7, 8], 2):
        s.add_request(r)
    step(s, runner)
    out = step(s, runner)
    assert out.copy_blocks == [(1, 3)] and blocks(s, "1_q") == [0, 3] and blocks(s, "0_q") == [0, 1, 2]
    assert ref_counts(s, [0, 1, 2, 3]) == [2, 1, 1, 1]
    step(s, runner)
    assert blocks(s, "1_q") == [0, 3, 4]
    while s.has_unfinished_requests():
        step(s, runner)
    step(s, runner)
    assert_nothing_held(s)


def test_a_sibling_whose_source_ended_computes_the_prompt_itself():
    """With max_tokens=1 the first sequence ends in the step that computes the prompt, before its
    siblings could start on its blocks: they compute the prompt on their own."""
    s = make_scheduler()
    runner = MemoryRunner(32, distinct_tokens)
    for r in children("r", [1, 2, 3, 4, 5, 6], 3, max_tokens=1):
        s.add_request(r)
    assert step(s, runner).num_scheduled_tokens == {"0_r": 6}
    out = step(s, runner)
    assert out.num_scheduled_tokens == {"1_r": 6, "2_r": 6} and out.copy_blocks == []
    step(s, runner)
    assert_nothing_held(s)


def test_preempted_and_aborted_siblings_release_their_references():
    """7 blocks, a 10-token prompt (3 blocks), n = 3: after the fork 0_r holds 0 1 2, 1_r 0 1 3,
    2_r 0 1 4 (blocks 0 and 1 three times), 5 blocks in use. Decoding, each sequence needs a
    4th block at its 13th token: 0_r takes 5, 1_r takes 6, and 2_r, the newest, preempts itself
    (its references drop: 0 and 1 go to 2, block 4 is freed). Then the request is aborted."""
    s = make_scheduler(num_blocks=7, max_model_len=24)
    runner = MemoryRunner(7, distinct_tokens)
    reqs = children("r", list(range(50, 60)), 3, max_tokens=10)
    for r in reqs:
        s.add_request(r)
    step(s, runner)
    step(s, runner)
    assert [blocks(s, r.request_id) for r in reqs] == [[0, 1, 2], [0, 1, 3], [0, 1, 4]]
    preempted = set()
    while not preempted:
        preempted |= step(s, runner).preempted_req_ids
    assert preempted == {"2_r"} and reqs[2].status == RequestStatus.PREEMPTED
    assert blocks(s, "0_r") == [0, 1, 2, 5] and blocks(s, "1_r") == [0, 1, 3, 6]
    assert ref_counts(s, [0, 1, 4]) == [2, 2, 0]
    s.finish_requests([r.request_id for r in reqs], RequestStatus.FINISHED_ABORTED)
    step(s, runner)
    assert_nothing_held(s)


def test_a_preempted_sibling_recomputes_on_its_own():
    """The same pool, 2_r preempted as above; nothing aborted: it comes back once the others end
    and recomputes prompt and outputs itself (no fork, no copy), and every sequence gets all
    its tokens."""
    s = make_scheduler(num_blocks=7, max_model_len=24)
    runner = MemoryRunner(7, distinct_tokens)
    reqs = children("r", list(range(50, 60)), 3, max_tokens=10)
    for r in reqs:
        s.add_request(r)
    copies = []
    while s.has_unfinished_requests():
        copies += step(s, runner).copy_blocks
    assert len(copies) == 2 and reqs[2].num_preemptions >= 1
    for r in reqs:
        assert r.output_token_ids == [distinct_tokens(r.request_id, j) for j in range(10)]
    step(s, runner)
    assert_nothing_held(s)


@pytest.mark.parametrize("caching", [False, True], ids=["nocache", "prefixcache"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_run_with_parallel_sampling_leaks_nothing(seed, caching):
    """300 steps of random arrivals (n = 1, 2 or 3; prompts often sharing a prefix), aborts of
    whole requests, stop tokens, and a pool small enough to preempt, checked by the simulated
    memory every step; then every request has ended and every block is free."""
    rng = random.Random(seed)
    num_blocks = 14  # 56 slots, max_model_len 40
    s = make_scheduler(num_blocks=num_blocks, budget=16, max_num_seqs=6, caching=caching, max_model_len=40)
    stop = 3
    runner = MemoryRunner(num_blocks, lambda rid, i: stop if rng.random() < 0.03 else rng.randrange(10, 20))
    prefixes = [[rng.randrange(1000, 2000) for _ in range(8)] for _ in range(3)]
    groups: dict[str, list[Request]] = {}
    aborted: set[str] = set()
    num_preempted = num_copies = 0
    for t in range(300):
        if rng.random() < 0.3:
            tokens = (list(rng.choice(prefixes))[:rng.randint(1, 8)] if rng.random() < 0.5 else []) + \
                [rng.randrange(1000, 2000) for _ in range(rng.randint(1, 12))]
            gid = f"g{t}"
            groups[gid] = children(gid, tokens, rng.choice([1, 2, 3]), max_tokens=rng.randint(1, 20),
                                   stop_token_ids=[stop])
            for r in groups[gid]:
                s.add_request(r)
        if rng.random() < 0.05 and groups:
            gid = rng.choice(sorted(groups))
            s.finish_requests([r.request_id for r in groups[gid]], RequestStatus.FINISHED_ABORTED)
            aborted.add(gid)
        out = step(s, runner)
        num_preempted += len(out.preempted_req_ids)
        num_copies += len(out.copy_blocks)
        kv = s.kv_cache_manager
        held = [b for blocks in kv.req_to_blocks.values() for b in blocks]
        assert all(b.ref_cnt == held.count(b) for b in kv.block_pool.blocks)
        assert kv.num_free_blocks == num_blocks - len(set(map(id, held)))
    for _ in range(2000):
        if not s.has_unfinished_requests():
            break
        step(s, runner)
    step(s, runner)
    assert num_preempted > 0 and num_copies > 0, "the run was meant to preempt and to fork"
    for gid, reqs in groups.items():
        for r in reqs:
            assert r.is_finished()
            if gid not in aborted:
                assert r.num_output_tokens == r.max_tokens or r.output_token_ids[-1] == stop
    assert_nothing_held(s)
