"""Async scheduling (the engine plans step N+1 while step N runs) against the synchronous engine,
which test_models_vs_hf checks against transformers: same tokens, finish reasons, logprobs and
stop handling, through chunked prefill, preemption, aborts and penalties, and every block back in
the pool at the end."""

from __future__ import annotations

import pytest

from folovllm import LLM, LLMEngine, SamplingParams

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27],
           [30], [40, 41, 42, 43, 44], [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60], [70, 71]]
MAX_TOKENS = [1, 2, 3, 7, 12, 20]


def make(path, async_scheduling: bool, **kw) -> LLM:
    # Prefix caching off: the row counts below assume every prompt token is computed each run.
    kw = dict(dict(max_model_len=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=16,
                   enable_prefix_caching=False), **kw)
    return LLM(path, device="cpu", async_scheduling=async_scheduling, **kw)


def run(llm: LLM, params) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)


def summary(outs) -> list:
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs]


def assert_all_free(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    engine.step()  # the runner drops the last finished requests' state
    pool = engine.engine_core.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_blocks
    runner = engine.engine_core.executor.driver_worker.model_runner
    assert not runner.input_batch.req_id_to_index and not runner._unread
    assert all(r.num_output_placeholders == 0 for r in engine.engine_core.scheduler.requests.values())


@pytest.fixture(scope="module")
def engines(tiny_models):
    path = tiny_models["qwen3"][0]
    return make(path, False), make(path, True)


def test_engine_flag_and_default(engines, tiny_models):
    sync, asyn = engines
    assert not sync.llm_engine.async_scheduling and asyn.llm_engine.async_scheduling
    # The default is on for CUDA and off on the CPU.
    assert not LLM(tiny_models["qwen3"][0], device="cpu", max_model_len=32).llm_engine.async_scheduling


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_same_tokens_as_sync(engines, kind):
    """Chunked prefill (16-token budget, a 19-token prompt), 4 requests at a time so that
    requests join while others decode, max_tokens from 1 to 20."""
    def params(i, m):
        if kind == "greedy":
            return SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
        return SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=m, ignore_eos=True)
    ps = [params(i, m) for i, m in enumerate(MAX_TOKENS)]
    sync, asyn = engines
    expect = summary(run(sync, ps))
    assert [len(t) for t, _, _ in expect] == MAX_TOKENS
    scheduler = asyn.llm_engine.engine_core.scheduler
    inner, counted = scheduler.schedule, []
    scheduler.schedule = lambda: counted.append(inner()) or counted[-1]
    try:
        assert summary(run(asyn, ps)) == expect
    finally:
        scheduler.schedule = inner
    # Requests that end by length get no row past their last token: every prompt token once,
    # and one row per generated token but the last.
    assert sum(so.total_num_scheduled_tokens for so in counted) == \
        sum(map(len, PROMPTS)) + sum(m - 1 for m in MAX_TOKENS)
    assert_all_free(asyn.llm_engine)


def test_stop_token_mid_sequence(engines):
    """A request ended by a stop token (which the scheduler cannot see coming) had one more row
    scheduled; that row is discarded and the output is what the synchronous engine gives."""
    sync, asyn = engines
    free_run = run(sync, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    stops = [o.outputs[0].token_ids[4] for o in free_run]
    ps = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[s]) for s in stops]
    expect = summary(run(sync, ps))
    assert all(reason == "stop" and len(t) <= 5 for t, reason, _ in expect)
    assert summary(run(asyn, ps)) == expect
    assert_all_free(asyn.llm_engine)


def test_penalties_and_logprobs(engines):
    """Penalties need every earlier token on the host: the runner waits for the step in flight
    first. Logprobs come back with their step."""
    ps = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, repetition_penalty=1.5,
                        presence_penalty=0.5, frequency_penalty=0.3, logprobs=3)
    sync, asyn = engines
    a, b = run(sync, ps), run(asyn, ps)
    assert summary(b) == summary(a)
    for x, y in zip(a, b):
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert lx.keys() == ly.keys()
            assert all(abs(lx[k] - ly[k]) < 1e-5 for k in lx)
    assert_all_free(asyn.llm_engine)


def test_preemption(tiny_models):
    """A pool too small for all requests: requests are preempted (some with a token in flight)
    and recomputed; tokens match a roomy synchronous engine."""
    path = tiny_models["qwen3"][0]
    ps = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expect = summary(run(make(path, False), ps))
    tight = make(path, True, num_gpu_blocks_override=8)
    assert summary(run(tight, ps)) == expect
    assert tight.llm_engine.engine_core.scheduler.num_preemptions > 0
    assert_all_free(tight.llm_engine)


def test_max_model_len_cap(engines):
    """A prompt 3 tokens short of max_model_len ends 'length' after 3 tokens in both modes: the
    scheduler does not schedule past the cap for the tokens in flight."""
    sync, asyn = engines
    prompt = {"prompt_token_ids": list(range(3, 64))}
    ps = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    a = sync.generate([prompt], ps, use_tqdm=False)
    b = asyn.generate([prompt], ps, use_tqdm=False)
    assert summary(b) == summary(a) and len(a[0].outputs[0].token_ids) == 3
    assert a[0].outputs[0].finish_reason == "length"
    assert_all_free(asyn.llm_engine)


def test_outputs_lag_one_step_and_abort_in_flight(engines):
    """step() returns the previous step's outputs while the new one is queued; a request aborted
    while its next token is in flight gets no more output, and the others are unaffected."""
    sync, asyn = engines
    engine = asyn.llm_engine
    ps = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, ps)
    engine.add_request("b", {"prompt_token_ids": [8, 9]}, SamplingParams(temperature=0.0, max_tokens=30,
                                                                        ignore_eos=True))
    assert engine.step() == []                       # the prefill is queued, nothing is back yet
    assert len(engine.engine_core.executor.driver_worker.model_runner._unread) == 1
    first = engine.step()                            # the prefill's tokens, while step 2 runs
    assert sorted(o.request_id for o in first) == ["a", "b"]
    assert all(len(o.outputs[0].token_ids) == 1 for o in first)
    engine.abort_request("b")
    seen, final = [], {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            seen.append(o.request_id)
            if o.finished:
                final[o.request_id] = o
    assert set(seen) == {"a"}
    expect = sync.generate([{"prompt_token_ids": [5, 6, 7]}], ps, use_tqdm=False)[0]
    assert final["a"].outputs[0].token_ids == expect.outputs[0].token_ids
    assert_all_free(engine)
