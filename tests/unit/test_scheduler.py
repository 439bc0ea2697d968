"""The Scheduler driven by a fake model runner.

The fake runner keeps its own copy of each request (tokens, computed count, block table) built
only from what SchedulerOutput tells it, the way a real runner does, and samples a token for a
request exactly when its computed count reaches its token count. Expected per-step schedules are
worked out by hand in the comments (block_size 4 throughout).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from folovllm.config import CacheConfig, SchedulerConfig
from folovllm.core.sched.output import ModelRunnerOutput, SchedulerOutput
from folovllm.core.sched.scheduler import Scheduler
from folovllm.request import Request, RequestStatus
from folovllm.sampling_params import SamplingParams

BS = 4
FILLER = 7  # the token the fake runner samples unless told otherwise; never a stop token here


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_scheduler(*, num_blocks: int = 64, budget: int = 32, max_num_seqs: int = 16,
                   chunked: bool = True, caching: bool = False, max_model_len: int = 64,
                   long_prefill: int = 0) -> Scheduler:
    sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                         enable_chunked_prefill=chunked, long_prefill_token_threshold=long_prefill)
    sc.finalize(max_model_len)
    cc = CacheConfig(block_size=BS, enable_prefix_caching=caching)
    cc.num_gpu_blocks = num_blocks
    return Scheduler(sc, cc)


def make_req(rid: str, prompt_len: int | None = None, *, tokens: list[int] | None = None,
             **params) -> Request:
    if tokens is None:
        tokens = [100 + i for i in range(prompt_len)]
    params.setdefault("max_tokens", 16)
    return Request(rid, tokens, SamplingParams(**params), arrival_time=0.0)


@dataclass
class _RunnerReq:
    tokens: list[int]
    num_prompt: int
    computed: int
    blocks: list[int] = field(default_factory=list)


class FakeRunner:
    """Mirrors a model runner: it only knows what the scheduler output tells it."""

    def __init__(self, token_fn=None) -> None:
        self.reqs: dict[str, _RunnerReq] = {}
        # token_fn(req_id, index of the output token) -> token id
        self.token_fn = token_fn or (lambda rid, i: FILLER)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_req_ids:
            self.reqs.pop(rid, None)
        for nr in out.scheduled_new_reqs:
            assert nr.req_id not in self.reqs, f"{nr.req_id} sent as new twice"
            self.reqs[nr.req_id] = _RunnerReq(list(nr.prompt_token_ids), len(nr.prompt_token_ids),
                                              nr.num_computed_tokens, list(nr.block_ids))
        for cr in out.scheduled_cached_reqs:
            st = self.reqs[cr.req_id]
            if cr.resumed_from_preemption:
                st.computed = cr.num_computed_tokens
                st.blocks = list(cr.new_block_ids)
            else:
                assert cr.num_computed_tokens == st.computed, (cr, st)
                st.blocks.extend(cr.new_block_ids)
        scheduled = set(out.num_scheduled_tokens)
        sent = {r.req_id for r in out.scheduled_new_reqs} | {r.req_id for r in out.scheduled_cached_reqs}
        # Running requests that got no new block are not re-sent: the runner knows them already.
        assert sent <= scheduled and scheduled - sent <= set(self.reqs)
        for cr in out.scheduled_cached_reqs:
            assert cr.resumed_from_preemption or cr.new_block_ids, f"{cr.req_id} sent with no news"
        req_ids, sampled = [], []
        for rid, n in out.num_scheduled_tokens.items():
            assert n >= 1
            st = self.reqs[rid]
            st.computed += n
            assert st.computed <= len(st.tokens), (rid, st)
            assert len(st.blocks) == cdiv(st.computed, BS), (rid, st)
            req_ids.append(rid)
            if st.computed == len(st.tokens):
                tok = self.token_fn(rid, len(st.tokens) - st.num_prompt)
                st.tokens.append(tok)
                sampled.append([tok])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids, sampled)


class Driver:
    def __init__(self, sched: Scheduler, token_fn=None) -> None:
        self.sched = sched
        self.runner = FakeRunner(token_fn)
        self.reqs: dict[str, Request] = {}
        self.finish_seen: list[str] = []

    def add(self, *reqs: Request) -> None:
        for r in reqs:
            self.reqs[r.request_id] = r
            self.sched.add_request(r)

    def step(self):
        out = self.sched.schedule()
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= self.sched.max_num_batched_tokens
        self.finish_seen.extend(out.finished_req_ids)
        runner_out = self.runner.execute(out)
        outputs = self.sched.update_from_output(out, runner_out)
        # Runner and scheduler agree on every live request's tokens and blocks.
        for rid, r in self.sched.requests.items():
            if r.status == RequestStatus.RUNNING:
                st = self.runner.reqs[rid]
                assert st.tokens == r.all_token_ids
                assert st.blocks == self.sched.kv_cache_manager.get_block_ids(rid)
        return out, outputs

    def blocks(self, rid: str) -> list[int]:
        return self.sched.kv_cache_manager.get_block_ids(rid)


def waiting_ids(s: Scheduler) -> list[str]:
    return [r.request_id for r in s.waiting]


def running_ids(s: Scheduler) -> list[str]:
    return [r.request_id for r in s.running]


# ---- token budget and chunked prefill -----------------------------------------------------------

def test_chunked_prefill_splits_a_long_prompt_into_budget_sized_chunks():
    s = make_scheduler(budget=8)
    d = Driver(s)
    a = make_req("A", 20, max_tokens=3)
    b = make_req("B", 6, max_tokens=2)
    d.add(a, b)
    # step: (scheduled tokens, A blocks, B blocks, A outputs, B outputs)
    # 1: A 8 (0->8, 2 blocks); budget gone, B waits.
    # 2: A 8 (8->16, 4 blocks).
    # 3: A 4 (16->20, 5 blocks, samples); B 4 of 6 (1 block).
    # 4: A 1 (20->21, 6 blocks, samples); B 2 (4->6, 2 blocks, samples).
    # 5: A 1 (21->22, samples: 3rd output -> length); B 1 (6->7, samples: 2nd -> length).
    expected = [
        ({"A": 8}, 2, 0, 0, 0),
        ({"A": 8}, 4, 0, 0, 0),
        ({"A": 4, "B": 4}, 5, 1, 1, 0),
        ({"A": 1, "B": 2}, 6, 2, 2, 1),
    ]
    for i, (sched, a_blocks, b_blocks, a_out, b_out) in enumerate(expected, 1):
        out, _ = d.step()
        assert out.num_scheduled_tokens == sched, i
        assert len(d.blocks("A")) == a_blocks, i
        assert len(d.blocks("B")) == b_blocks, i
        assert a.num_output_tokens == a_out and b.num_output_tokens == b_out, i
    out, outputs = d.step()
    assert out.num_scheduled_tokens == {"A": 1, "B": 1}
    assert {o.req_id: o.finish_reason for o in outputs} == {"A": "length", "B": "length"}
    assert a.num_computed_tokens == 22 and a.num_tokens == 23
    out, _ = d.step()
    assert out.is_empty and out.finished_req_ids == {"A", "B"}
    assert s.kv_cache_manager.num_free_blocks == 64


def test_chunk_metadata_sent_to_the_runner():
    s = make_scheduler(budget=8)
    d = Driver(s)
    d.add(make_req("A", 20, max_tokens=3))
    out, _ = d.step()
    (nr,) = out.scheduled_new_reqs
    assert nr.req_id == "A" and nr.num_computed_tokens == 0 and len(nr.block_ids) == 2
    assert nr.prompt_token_ids == [100 + i for i in range(20)]
    assert out.scheduled_cached_reqs == []
    out, _ = d.step()
    (cr,) = out.scheduled_cached_reqs
    assert cr.req_id == "A" and not cr.resumed_from_preemption
    assert cr.num_computed_tokens == 8 and len(cr.new_block_ids) == 2
    assert out.scheduled_new_reqs == []


def test_token_budget_is_shared_by_running_and_waiting_requests():
    s = make_scheduler(budget=10)
    d = Driver(s)
    d.add(*(make_req(f"R{i}", 7, max_tokens=20) for i in range(4)))
    # 1: R0 7, R1 3 (chunk).  2: R0 1, R1 4 (done), R2 5.  3: R0 1, R1 1, R2 2 (done), R3 6.
    # 4: R0 1, R1 1, R2 1, R3 1 (done: 6+1 = 7).
    expected = [
        {"R0": 7, "R1": 3},
        {"R0": 1, "R1": 4, "R2": 5},
        {"R0": 1, "R1": 1, "R2": 2, "R3": 6},
        {"R0": 1, "R1": 1, "R2": 1, "R3": 1},
    ]
    for i, exp in enumerate(expected, 1):
        out, _ = d.step()
        assert out.num_scheduled_tokens == exp, i
        assert out.total_num_scheduled_tokens == sum(exp.values()) <= 10


def test_long_prefill_threshold_caps_one_prompt_per_step_and_leaves_room_for_others():
    """Budget 16, threshold 6: A's 20-token prompt goes 6 + 6 + 6 + 2 rather than 16 + 4, and B
    (arriving with A) starts in the first step instead of waiting for A's chunks."""
    s = make_scheduler(budget=16, long_prefill=6)
    d = Driver(s)
    d.add(make_req("A", 20, max_tokens=2), make_req("B", 9, max_tokens=2))
    # 1: A 6, B 6 (of 9).  2: A 6, B 3 (prompt done: 1st token).  3: A 6, B 1 (2nd token:
    # length).  4: A 2 (prompt done), B gone.
    expected = [{"A": 6, "B": 6}, {"A": 6, "B": 3}, {"A": 6, "B": 1}, {"A": 2}]
    for i, exp in enumerate(expected, 1):
        out, _ = d.step()
        assert out.num_scheduled_tokens == exp, i


def test_long_prefill_threshold_needs_chunked_prefill():
    with pytest.raises(ValueError, match="long_prefill_token_threshold needs chunked prefill"):
        SchedulerConfig(enable_chunked_prefill=False, long_prefill_token_threshold=8)
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be an int >= 0"):
        SchedulerConfig(long_prefill_token_threshold=-1)


def test_without_chunked_prefill_a_prompt_that_does_not_fit_waits_and_nobody_overtakes_it():
    s = make_scheduler(budget=16, chunked=False, max_model_len=16)
    d = Driver(s)
    d.add(make_req("A", 10, max_tokens=3), make_req("B", 12, max_tokens=3), make_req("C", 2, max_tokens=3))
    # 1: A takes 10 of 16; B needs 12 > 6 and is not split; C (2) would fit but may not overtake.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 10}
    assert waiting_ids(s) == ["B", "C"]
    assert d.reqs["B"].num_computed_tokens == 0
    # 2: A decodes 1; B whole (12); C 2: 15 tokens.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1, "B": 12, "C": 2}


def test_with_chunked_prefill_the_same_prompt_is_split_instead():
    s = make_scheduler(budget=16, chunked=True, max_model_len=16)
    d = Driver(s)
    d.add(make_req("A", 10, max_tokens=3), make_req("B", 12, max_tokens=3), make_req("C", 2, max_tokens=3))
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 10, "B": 6}
    out, _ = d.step()
    # A 1, B the other 6, C 2.
    assert out.num_scheduled_tokens == {"A": 1, "B": 6, "C": 2}


# ---- max_num_seqs and continuous batching -------------------------------------------------------

def test_max_num_seqs_caps_running_requests():
    s = make_scheduler(budget=64, max_num_seqs=2)
    d = Driver(s)
    d.add(*(make_req(r, 3, max_tokens=2) for r in "ABCDE"))
    expected = [
        ({"A": 3, "B": 3}, set()),
        ({"A": 1, "B": 1}, set()),   # both reach 2 outputs and finish
        ({"C": 3, "D": 3}, {"A", "B"}),
        ({"C": 1, "D": 1}, set()),
        ({"E": 3}, {"C", "D"}),
        ({"E": 1}, set()),
    ]
    for i, (exp, finished) in enumerate(expected, 1):
        out, _ = d.step()
        assert out.num_scheduled_tokens == exp, i
        assert out.finished_req_ids == finished, i
        assert len(s.running) <= 2
    out, _ = d.step()
    assert out.is_empty and out.finished_req_ids == {"E"}
    assert not s.has_unfinished_requests()


def test_continuous_batching_admits_new_requests_while_others_decode():
    s = make_scheduler(budget=16)
    d = Driver(s)
    d.add(make_req("A", 4, max_tokens=5))
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 4}
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1}
    d.add(make_req("B", 6, max_tokens=5))
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1, "B": 6}
    assert [r.req_id for r in out.scheduled_new_reqs] == ["B"]
    assert out.scheduled_cached_reqs == []  # A's 6th token fits the block it got in step 2
    assert out.scheduled_new_reqs[0].block_ids == d.blocks("B") and len(d.blocks("B")) == 2
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1, "B": 1}
    assert running_ids(s) == ["A", "B"]
    assert d.reqs["A"].num_output_tokens == 4 and d.reqs["B"].num_output_tokens == 2


# ---- preemption ---------------------------------------------------------------------------------

def test_preemption_takes_the_newest_running_request_and_puts_it_at_the_front():
    # 6 blocks of 4; A B C (7-token prompts, 10 outputs each) and D (4 tokens, 2 outputs).
    s = make_scheduler(num_blocks=6, budget=32, max_model_len=24)
    d = Driver(s)
    A, B, C = (make_req(r, 7, max_tokens=10) for r in "ABC")
    D = make_req("D", 4, max_tokens=2)
    d.add(A, B, C, D)
    # 1: A B C 7 tokens each, 2 blocks each -> pool empty; D (1 block) waits. All sample (8 tokens).
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 7, "B": 7, "C": 7}
    assert waiting_ids(s) == ["D"] and s.kv_cache_manager.num_free_blocks == 0
    # 2: each computes token 8 -> still 2 blocks. 9 tokens each.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1, "B": 1, "C": 1} and not out.preempted_req_ids
    # 3: A needs a 3rd block, none free -> C (newest) is preempted, its 2 blocks go to A and B.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1, "B": 1}
    assert out.preempted_req_ids == {"C"}
    assert C.status == RequestStatus.PREEMPTED and C.num_computed_tokens == 0
    assert C.num_preemptions == 1 and s.num_preemptions == 1
    assert C.num_tokens == 9  # its tokens are kept
    assert d.blocks("C") == []
    assert waiting_ids(s) == ["C", "D"]
    assert running_ids(s) == ["A", "B"]
    assert len(d.blocks("A")) == 3 and len(d.blocks("B")) == 3
    # 4-6: A and B decode (tokens 10..12 computed, 3 blocks each); C needs 3 blocks, none free.
    for _ in range(3):
        out, _ = d.step()
        assert out.num_scheduled_tokens == {"A": 1, "B": 1} and not out.preempted_req_ids
    # 7: A computes its 13th token -> 4th block -> B (now the newest) is preempted; B goes in
    # front of C.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1}
    assert out.preempted_req_ids == {"B"}
    assert waiting_ids(s) == ["B", "C", "D"]
    assert B.num_tokens == 13 and B.num_computed_tokens == 0
    # 8-10: A alone (2 blocks free; B needs 4, and D (1 block) may not overtake B and C).
    # A's 10th output comes at step 10.
    for i in range(3):
        out, outputs = d.step()
        assert out.num_scheduled_tokens == {"A": 1}
        assert waiting_ids(s) == ["B", "C", "D"]
    assert outputs[0].finish_reason == "length" and A.num_output_tokens == 10
    # 11: B resumes: all 13 tokens again, 4 fresh blocks, flagged as resumed.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"B": 13}
    assert out.finished_req_ids == {"A"}
    assert out.scheduled_new_reqs == []
    (cr,) = out.scheduled_cached_reqs
    assert cr.req_id == "B" and cr.resumed_from_preemption is True
    assert cr.num_computed_tokens == 0
    assert cr.new_block_ids == d.blocks("B") and len(cr.new_block_ids) == 4
    assert B.status == RequestStatus.RUNNING
    assert waiting_ids(s) == ["C", "D"]
    # 12-14: B decodes to its 10th output (tokens 14..16 computed, 4 blocks). C needs 3 blocks,
    # 2 are free; D fits in 1 but may not overtake.
    for _ in range(3):
        out, outputs = d.step()
        assert out.num_scheduled_tokens == {"B": 1}
    assert outputs[0].finish_reason == "length"
    # 15: C resumes before D.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"C": 9, "D": 4}
    assert [(r.req_id, r.resumed_from_preemption, r.num_computed_tokens) for r in out.scheduled_cached_reqs] \
        == [("C", True, 0)]
    assert [r.req_id for r in out.scheduled_new_reqs] == ["D"]
    assert len(out.scheduled_cached_reqs[0].new_block_ids) == 3
    # Run to the end: everyone gets all its tokens.
    for _ in range(40):
        if not s.has_unfinished_requests():
            break
        d.step()
    assert not s.has_unfinished_requests()
    assert [r.num_output_tokens for r in (A, B, C, D)] == [10, 10, 10, 2]
    assert all(r.get_finished_reason() == "length" for r in (A, B, C, D))
    assert s.kv_cache_manager.num_free_blocks == 6


def test_no_request_is_admitted_in_a_step_that_preempted():
    # 4 blocks, budget 5. A and B: 2-token prompts, 12 outputs.
    s = make_scheduler(num_blocks=4, budget=5, max_model_len=16)
    d = Driver(s)
    A = make_req("A", 2, max_tokens=12)
    B = make_req("B", 2, max_tokens=12)
    d.add(A, B)
    # 1: A 2, B 2 (1 block each). 2-7: both decode; at step 4 each takes its 2nd block.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 2, "B": 2}
    for _ in range(6):
        out, _ = d.step()
        assert out.num_scheduled_tokens == {"A": 1, "B": 1}
    assert s.kv_cache_manager.num_free_blocks == 0
    assert A.num_tokens == 9 and B.num_tokens == 9
    # 8: A computes its 9th token -> 3rd block -> B preempted (frees 2, A takes 1, 1 free).
    # 4 tokens of budget are left and B's first chunk (4 tokens, 1 block) would fit, but a step
    # that preempted admits nobody.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1}
    assert out.preempted_req_ids == {"B"}
    assert out.scheduled_cached_reqs[0].req_id == "A" and len(out.scheduled_cached_reqs) == 1
    assert waiting_ids(s) == ["B"] and B.status == RequestStatus.PREEMPTED
    assert s.kv_cache_manager.num_free_blocks == 1
    # 9: now B is readmitted with a 4-token chunk in the free block.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1, "B": 4}
    cr = {r.req_id: r for r in out.scheduled_cached_reqs}
    assert cr["B"].resumed_from_preemption and cr["B"].num_computed_tokens == 0
    assert cr["B"].new_block_ids == d.blocks("B") and len(cr["B"].new_block_ids) == 1
    assert "A" not in cr  # A's 10th token fits the 3rd block it got in step 8
    # 10: B's next chunk needs a 2nd block; none free; B is the newest, so it preempts itself.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1}
    assert out.preempted_req_ids == {"B"}
    assert B.num_preemptions == 2 and B.num_computed_tokens == 0
    assert running_ids(s) == ["A"] and waiting_ids(s) == ["B"]
    # Everything still finishes.
    for _ in range(60):
        if not s.has_unfinished_requests():
            break
        d.step()
    assert not s.has_unfinished_requests()
    assert A.num_output_tokens == 12 and B.num_output_tokens == 12
    assert s.kv_cache_manager.num_free_blocks == 4


# ---- prefix caching through the scheduler --------------------------------------------------------

def test_prefix_cache_hit_skips_the_shared_blocks():
    s = make_scheduler(budget=32, caching=True)
    d = Driver(s)
    prefix = [11, 12, 13, 14, 21, 22, 23, 24]
    A = make_req("A", tokens=prefix + [31, 32], max_tokens=5)
    d.add(A)
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 10}
    a_blocks = d.blocks("A")
    assert len(a_blocks) == 3
    B = make_req("B", tokens=prefix + [41, 42, 43], max_tokens=5)
    d.add(B)
    # B: 2 cached blocks (8 tokens) -> only 3 of its 11 tokens are computed, in 1 new block.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1, "B": 3}
    (nr,) = out.scheduled_new_reqs
    assert nr.num_computed_tokens == 8
    assert nr.block_ids[:2] == a_blocks[:2] and len(nr.block_ids) == 3
    assert nr.block_ids[2] not in a_blocks
    assert B.num_computed_tokens == 11 and B.num_output_tokens == 1
    pool = s.kv_cache_manager.block_pool
    assert [pool.blocks[i].ref_cnt for i in a_blocks] == [2, 2, 1]
    # An identical prompt still recomputes its last token: only the 2 full blocks before it are
    # hits (8 tokens); 2 tokens are computed.
    C = make_req("C", tokens=prefix + [31, 32], max_tokens=5)
    d.add(C)
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 1, "B": 1, "C": 2}
    assert [pool.blocks[i].ref_cnt for i in a_blocks[:2]] == [3, 3]
    run_to_end(d)
    assert s.kv_cache_manager.num_free_blocks == 64
    assert all(b.ref_cnt == 0 for b in pool.blocks)


def test_preempted_request_resumes_from_its_own_surviving_cached_blocks():
    # 7 blocks. A, B: 7-token prompts (2 blocks), 3 outputs. C: 11-token prompt (3 blocks), 5 outputs.
    s = make_scheduler(num_blocks=7, budget=32, max_model_len=28, caching=True)
    d = Driver(s)
    A = make_req("A", tokens=[10 + j for j in range(7)], max_tokens=3)
    B = make_req("B", tokens=[20 + j for j in range(7)], max_tokens=3)
    C = make_req("C", tokens=[30 + j for j in range(11)], max_tokens=5)
    d.add(A, B, C)
    # 1: A [0 1], B [2 3], C [4 5 6]; pool empty.  2: one decode each; C's 3 blocks are now full.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 7, "B": 7, "C": 11}
    assert d.blocks("C") == [4, 5, 6]
    d.step()
    # 3: A needs a 3rd block -> C preempted; its blocks go to the free queue tail first
    # (6 5 4); A takes 6, B takes 5. Block 4 (C's first, cached) survives. A and B finish.
    out, _ = d.step()
    assert out.preempted_req_ids == {"C"}
    assert out.num_scheduled_tokens == {"A": 1, "B": 1}
    assert {r.req_id: r.new_block_ids for r in out.scheduled_cached_reqs} == {"A": [6], "B": [5]}
    assert A.is_finished() and B.is_finished()  # freed: queue 4 | 6 1 0 | 5 3 2
    # 4: C (13 tokens) resumes: block 4 is a hit (4 tokens), its 2nd block was evicted, so 9
    # tokens are computed in 3 new blocks taken from the queue head (6, 1, 0).
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"C": 9}
    (cr,) = out.scheduled_cached_reqs
    assert cr.resumed_from_preemption and cr.num_computed_tokens == 4
    assert cr.new_block_ids == [4, 6, 1, 0] == d.blocks("C")
    run_to_end(d)
    assert C.num_output_tokens == 5
    assert s.kv_cache_manager.num_free_blocks == 7


# ---- stop conditions ----------------------------------------------------------------------------

def run_to_end(d: Driver, max_steps: int = 200) -> dict[str, list]:
    """Steps until nothing is left; returns every EngineCoreOutput per request."""
    seen: dict[str, list] = {}
    for _ in range(max_steps):
        if not d.sched.has_unfinished_requests():
            break
        _, outputs = d.step()
        for o in outputs:
            seen.setdefault(o.req_id, []).append(o)
    assert not d.sched.has_unfinished_requests()
    return seen


def test_max_tokens_finishes_with_length():
    s = make_scheduler()
    d = Driver(s)
    r = make_req("A", 5, max_tokens=3)
    d.add(r)
    seen = run_to_end(d)
    assert r.output_token_ids == [FILLER] * 3
    assert [o.finish_reason for o in seen["A"]] == [None, None, "length"]
    assert [o.new_token_ids for o in seen["A"]] == [[FILLER]] * 3
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED and r.stop_reason is None
    assert s.kv_cache_manager.num_free_blocks == 64


def test_stop_token_id_finishes_with_stop_and_records_the_id():
    script = [5, 6, 9, 5]
    s = make_scheduler()
    d = Driver(s, token_fn=lambda rid, i: script[i])
    r = make_req("A", 5, max_tokens=10, stop_token_ids=[9])
    d.add(r)
    seen = run_to_end(d)
    assert r.output_token_ids == [5, 6, 9]
    assert seen["A"][-1].finish_reason == "stop" and seen["A"][-1].stop_reason == 9
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 9
    assert s.kv_cache_manager.num_free_blocks == 64


def test_eos_stops_without_a_stop_reason_but_is_ignored_before_min_tokens():
    s = make_scheduler()
    d = Driver(s, token_fn=lambda rid, i: 2)  # always EOS
    early = make_req("early", 4, max_tokens=10)
    late = make_req("late", 4, max_tokens=10, min_tokens=3)
    ignore = make_req("ignore", 4, max_tokens=4, ignore_eos=True)
    for r in (early, late, ignore):
        r.sampling_params.update_from_generation_config({2})
    d.add(early, late, ignore)
    seen = run_to_end(d)
    # No min_tokens: the first EOS stops.
    assert early.output_token_ids == [2]
    assert seen["early"][-1].finish_reason == "stop" and early.stop_reason is None
    # min_tokens=3: the first two EOS are ordinary tokens, the third (output #3) stops.
    assert late.output_token_ids == [2, 2, 2]
    assert [o.finish_reason for o in seen["late"]] == [None, None, "stop"]
    assert late.stop_reason is None
    # ignore_eos: runs to max_tokens.
    assert ignore.output_token_ids == [2, 2, 2, 2]
    assert seen["ignore"][-1].finish_reason == "length"


def test_stop_token_id_is_also_held_back_by_min_tokens():
    s = make_scheduler()
    d = Driver(s, token_fn=lambda rid, i: 9)
    r = make_req("A", 4, max_tokens=10, min_tokens=2, stop_token_ids=[9])
    d.add(r)
    seen = run_to_end(d)
    assert r.output_token_ids == [9, 9]
    assert seen["A"][-1].finish_reason == "stop" and r.stop_reason == 9


def test_max_model_len_caps_generation():
    s = make_scheduler(max_model_len=10)
    d = Driver(s)
    capped = make_req("capped", 7, max_tokens=100)
    unlimited = make_req("unlimited", 4, max_tokens=None)
    d.add(capped, unlimited)
    seen = run_to_end(d)
    # 7 prompt tokens + 3 generated = 10 = max_model_len.
    assert capped.num_output_tokens == 3 and capped.num_tokens == 10
    assert seen["capped"][-1].finish_reason == "length"
    assert unlimited.num_output_tokens == 6 and unlimited.num_tokens == 10
    assert seen["unlimited"][-1].finish_reason == "length"


# ---- abort --------------------------------------------------------------------------------------

def test_abort_waiting_and_running_requests_frees_blocks_and_reports_them_once():
    s = make_scheduler(num_blocks=16, budget=8, max_num_seqs=2)
    d = Driver(s)
    A = make_req("A", 12, max_tokens=10)   # chunked over two steps
    B = make_req("B", 3, max_tokens=10)
    C = make_req("C", 3, max_tokens=10)    # kept waiting by max_num_seqs
    d.add(A, B, C)
    # 1: A 8 (2 blocks); budget gone.
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 8}
    # 2: A 4 (3 blocks, samples), B 3 (1 block). C waits (2 running).
    out, _ = d.step()
    assert out.num_scheduled_tokens == {"A": 4, "B": 3}
    assert s.kv_cache_manager.num_free_blocks == 12
    assert waiting_ids(s) == ["C"]

    s.finish_requests(["C", "A"], RequestStatus.FINISHED_ABORTED)
    assert A.status == RequestStatus.FINISHED_ABORTED and C.status == RequestStatus.FINISHED_ABORTED
    assert A.get_finished_reason() == "abort"
    assert s.kv_cache_manager.num_free_blocks == 15  # A's 3 blocks back, C held none
    assert d.blocks("A") == []
    assert waiting_ids(s) == [] and running_ids(s) == ["B"]
    assert "A" not in s.requests and "C" not in s.requests
    # Aborting again, or an unknown id, does nothing.
    s.finish_requests("A", RequestStatus.FINISHED_ABORTED)
    s.finish_requests("nope", RequestStatus.FINISHED_ABORTED)
    out, _ = d.step()
    assert out.finished_req_ids == {"A", "C"}
    assert out.num_scheduled_tokens == {"B": 1}
    out, _ = d.step()
    assert out.finished_req_ids == set()
    # Abort B between schedule() and update_from_output(): its sampled token is dropped.
    out = s.schedule()
    assert out.num_scheduled_tokens == {"B": 1}
    runner_out = d.runner.execute(out)
    s.finish_requests("B", RequestStatus.FINISHED_ABORTED)
    n_before = B.num_output_tokens
    assert s.update_from_output(out, runner_out) == []
    assert B.num_output_tokens == n_before
    assert s.kv_cache_manager.num_free_blocks == 16
    out = s.schedule()
    assert out.finished_req_ids == {"B"} and out.is_empty


def test_abort_a_preempted_request():
    s = make_scheduler(num_blocks=6, budget=32, max_model_len=24)
    d = Driver(s)
    d.add(*(make_req(r, 7, max_tokens=10) for r in "ABC"))
    for _ in range(3):
        out, _ = d.step()
    assert out.preempted_req_ids == {"C"}
    s.finish_requests("C", RequestStatus.FINISHED_ABORTED)
    assert waiting_ids(s) == []
    assert s.kv_cache_manager.num_free_blocks == 0  # C had no blocks left; A and B hold 3 each
    out, _ = d.step()
    assert "C" in out.finished_req_ids


def test_duplicate_request_id_is_rejected():
    s = make_scheduler()
    s.add_request(make_req("A", 3))
    with pytest.raises(ValueError):
        s.add_request(make_req("A", 3))


# ---- randomized ---------------------------------------------------------------------------------

def check_invariants(s: Scheduler, out: SchedulerOutput, caching: bool, chunked: bool) -> None:
    kv = s.kv_cache_manager
    pool = kv.block_pool
    assert out.total_num_scheduled_tokens <= s.max_num_batched_tokens
    assert sum(out.num_scheduled_tokens.values()) == out.total_num_scheduled_tokens
    assert len(s.running) <= s.max_num_seqs
    # Who holds which block.
    holders: dict[int, list[tuple[str, int]]] = {}
    held = 0
    for rid, blocks in kv.req_to_blocks.items():
        assert rid in s.requests, f"finished request {rid} still holds blocks"
        held += len(blocks)
        for idx, b in enumerate(blocks):
            holders.setdefault(b.block_id, []).append((rid, idx))
    assert sum(b.ref_cnt for b in pool.blocks) == held
    for b in pool.blocks:
        assert b.ref_cnt == len(holders.get(b.block_id, [])), b
    for block_id, hs in holders.items():
        if len(hs) > 1:
            assert caching, f"block {block_id} held by {hs} without prefix caching"
            # A shared block sits at the same position of every holder, over the same tokens.
            positions = {idx for _, idx in hs}
            assert len(positions) == 1
            (idx,) = positions
            contents = {tuple(s.requests[rid].all_token_ids[idx * BS:(idx + 1) * BS]) for rid, _ in hs}
            assert len(contents) == 1
            assert all(s.requests[rid].num_computed_tokens >= (idx + 1) * BS for rid, _ in hs)
    # Free queue = blocks nobody holds.
    free = list(pool.free_block_queue)
    assert len(free) == pool.get_num_free_blocks() == pool.num_blocks - len(holders)
    # Running requests hold exactly the blocks their computed tokens need; waiting ones none.
    for r in s.running:
        assert r.status == RequestStatus.RUNNING
        assert len(kv.get_block_ids(r.request_id)) == cdiv(r.num_computed_tokens, BS)
        assert r.num_computed_tokens <= r.num_tokens
    for r in s.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert kv.get_block_ids(r.request_id) == []
        assert r.num_computed_tokens == 0
    assert len({id(r) for r in s.running} | {id(r) for r in s.waiting}) == len(s.running) + len(s.waiting)
    assert set(s.requests) == {r.request_id for r in s.running} | {r.request_id for r in s.waiting}
    if not chunked:
        for rid in out.num_scheduled_tokens:
            r = s.requests.get(rid)
            if r is not None:
                # Never a partial prompt: a scheduled request computes up to its last token.
                assert r.num_computed_tokens == r.num_tokens


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
@pytest.mark.parametrize("caching", [False, True], ids=["nocache", "prefixcache"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_keeps_invariants(seed, caching, chunked):
    rng = random.Random(seed)
    max_model_len = 40
    num_blocks = 12  # 48 token slots: a full-length request always fits alone
    budget = 16 if chunked else 40
    s = make_scheduler(num_blocks=num_blocks, budget=budget, max_num_seqs=4, chunked=chunked,
                       caching=caching, max_model_len=max_model_len)
    prefixes = [[rng.randrange(1000, 2000) for _ in range(8)] for _ in range(3)]
    stop_tok = 3

    def token_fn(rid, i):
        return stop_tok if rng.random() < 0.03 else rng.randrange(10, 20)

    d = Driver(s, token_fn=token_fn)
    submitted: dict[str, Request] = {}
    aborted: set[str] = set()
    finished_reported: list[str] = []
    n = 0
    preemptions_seen = 0
    total_steps = 0

    def do_step(allow_abort: bool):
        nonlocal preemptions_seen, total_steps
        total_steps += 1
        out = s.schedule()
        finished_reported.extend(out.finished_req_ids)
        preemptions_seen += len(out.preempted_req_ids)
        check_invariants(s, out, caching, chunked)
        runner_out = d.runner.execute(out)
        if allow_abort and s.running and rng.random() < 0.1:
            # Abort between schedule and update: its sampled token must be dropped.
            victim = rng.choice(s.running)
            s.finish_requests(victim.request_id, RequestStatus.FINISHED_ABORTED)
            aborted.add(victim.request_id)
        s.update_from_output(out, runner_out)
        for rid, r in s.requests.items():
            if r.status == RequestStatus.RUNNING and rid in out.num_scheduled_tokens:
                assert d.runner.reqs[rid].tokens == r.all_token_ids

    for _ in range(300):
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
            if rng.random() < 0.5:
                tokens = list(rng.choice(prefixes))[:rng.randint(4, 8)] + \
                    [rng.randrange(1000, 2000) for _ in range(rng.randint(0, 12))]
            else:
                tokens = [rng.randrange(1000, 2000) for _ in range(rng.randint(1, 20))]
            max_tokens = rng.randint(1, 24)
            params = dict(max_tokens=max_tokens, min_tokens=rng.randint(0, min(2, max_tokens)),
                          stop_token_ids=[stop_tok] if rng.random() < 0.5 else None)
            r = make_req(f"r{n}", tokens=tokens, **params)
            n += 1
            submitted[r.request_id] = r
            s.add_request(r)
        if rng.random() < 0.08 and s.requests:
            rid = rng.choice(sorted(s.requests))
            s.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        do_step(allow_abort=True)

    # Drain: no more arrivals or aborts.
    for _ in range(2000):
        if not s.has_unfinished_requests():
            break
        do_step(allow_abort=False)
    assert not s.has_unfinished_requests(), "requests never finished"
    out = s.schedule()
    finished_reported.extend(out.finished_req_ids)
    assert out.is_empty

    assert preemptions_seen > 0, "the workload was meant to preempt"
    assert n > 100
    # Every request ended, was reported finished exactly once, and ended the right way.
    assert sorted(finished_reported) == sorted(submitted)
    for rid, r in submitted.items():
        assert r.is_finished(), r
        if rid in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
            continue
        p = r.sampling_params
        assert 1 <= r.num_output_tokens <= p.max_tokens
        assert r.num_tokens <= max_model_len
        if r.status == RequestStatus.FINISHED_STOPPED:
            assert r.output_token_ids[-1] == stop_tok and r.stop_reason == stop_tok
            assert r.num_output_tokens >= p.min_tokens
            # An earlier stop token can only sit before output #min_tokens.
            assert stop_tok not in r.output_token_ids[max(p.min_tokens - 1, 0):-1]
        else:
            assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED
            assert r.num_output_tokens == p.max_tokens or r.num_tokens == max_model_len
            if p.stop_token_ids:
                assert stop_tok not in r.output_token_ids[max(p.min_tokens - 1, 0):]
    # The pool is back to all free.
    kv = s.kv_cache_manager
    assert kv.num_free_blocks == num_blocks
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
    assert kv.req_to_blocks == {} and kv.req_to_block_hashes == {}
    assert s.requests == {} and not s.running and not s.waiting
