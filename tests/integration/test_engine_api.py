"""The original plan's engine API and vLLM's LLM API, end to end on a tiny model."""

from __future__ import annotations

import pytest

from folovllm import (CacheConfig, LLM, LLMEngine, ModelConfig, RequestOutput, SamplingParams,
                      SchedulerConfig)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return LLMEngine(ModelConfig(tiny_models["qwen3"][0], max_model_len=128),
                     scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
                     cache_config=CacheConfig(block_size=8), device="cpu")


def ids(*xs):
    return {"prompt_token_ids": list(xs)}


def test_configs_reach_the_engine(engine):
    assert engine.engine_core.scheduler.max_num_seqs == 4
    assert engine.engine_core.scheduler.max_num_batched_tokens == 32
    assert engine.engine_core.scheduler.block_size == 8
    assert engine.max_model_len == 128


def test_generate_and_generate_batch_agree(engine):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    single = engine.generate(ids(5, 6, 7), params)
    assert isinstance(single, RequestOutput) and single.finished
    batch = engine.generate_batch([ids(9, 10), ids(5, 6, 7), ids(11, 12, 13, 14, 15)], params)
    assert list(batch) == sorted(batch, key=int)  # prompt order
    outs = list(batch.values())
    assert [o.prompt_token_ids for o in outs] == [[9, 10], [5, 6, 7], [11, 12, 13, 14, 15]]
    assert outs[1].outputs[0].token_ids == single.outputs[0].token_ids
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)


def test_step_streams_growing_outputs_and_abort_frees_blocks(engine):
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("keep", ids(1, 2, 3), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.add_request("drop", ids(4, 5, 6), params)
    lengths = []
    for _ in range(3):
        for out in engine.step():
            if out.request_id == "keep":
                lengths.append(len(out.outputs[0].token_ids))
    assert lengths == [1, 2, 3]
    engine.abort_request("drop")
    finals = [o for _ in range(5) for o in engine.step()]
    assert [o.request_id for o in finals] == ["keep"] and finals[0].finished
    assert not engine.has_unfinished_requests()
    engine.step()  # the runner drops the finished requests' state
    pool = engine.engine_core.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_blocks
    assert not engine.engine_core.executor.driver_worker.model_runner.input_batch.req_id_to_index


def test_metrics_are_ordered(engine):
    out = engine.generate(ids(3, 4), SamplingParams(max_tokens=3, ignore_eos=True))
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.time_to_first_token >= 0


def test_same_seed_same_tokens_whatever_the_batch(engine):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    alone = engine.generate(ids(7, 8, 9), seeded).outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    batch = engine.generate_batch([ids(1, 2), ids(7, 8, 9), ids(3)], [others, seeded, others])
    assert list(batch.values())[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=8, ignore_eos=True)
    assert engine.generate(ids(7, 8, 9), other_seed).outputs[0].token_ids != alone


def test_seeds_that_differ_only_above_32_bits_draw_differently(engine):
    """The CPU generator keeps 32 bits of a seed; the runner folds the high ones in, so these do
    not collide."""
    def draw(seed):
        p = SamplingParams(temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True)
        return engine.generate(ids(7, 8, 9), p).outputs[0].token_ids

    low = draw(1234)
    assert draw(1234 + 2**32) != low and draw(1234 + 2**40) != low and draw(1234 + 2**32) != draw(1234 + 2**40)


def test_stop_token_ids_and_eos(engine):
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    toks = engine.generate(ids(5, 6, 7), greedy).outputs[0].token_ids
    stop_at = toks[2]
    first = toks.index(stop_at)
    out = engine.generate(ids(5, 6, 7), SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_at],
                                                       ignore_eos=True)).outputs[0]
    assert out.token_ids == toks[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # The tiny config's eos_token_id is 2: stopping on it is the default.
    assert engine.processor.eos_token_ids == {2}


def test_logprobs_are_reported(engine):
    out = engine.generate(ids(5, 6), SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, ignore_eos=True))
    c = out.outputs[0]
    assert len(c.logprobs) == 3
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert tok in lp and 2 <= len(lp) <= 3
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token
    assert c.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(c.token_ids, c.logprobs)))


def test_llm_outputs_in_prompt_order_with_per_prompt_params(tiny_models):
    llm = LLM(tiny_models["llama"][0], max_num_seqs=2)
    outs = llm.generate([ids(1, 2, 3), ids(4), ids(5, 6)],
                        [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 1, 2)], use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [[1, 2, 3], [4], [5, 6]]
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 1, 2]


def test_llm_freezes_what_start_up_left(tiny_models):
    """LLM() moves its start-up heap out of the collector's full passes, as the engine-core
    process and the server do (in a fresh process: this one's freeze count is not its own)."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent(f"""
        import gc
        from folovllm import LLM
        assert gc.get_freeze_count() == 0
        llm = LLM({str(tiny_models["qwen3"][0])!r}, max_model_len=64, device="cpu")
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
        assert llm.llm_engine.startup_times["gc_freeze"] >= 0
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
