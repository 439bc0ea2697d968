"""A batch from LLM.generate / generate_batch is queued slice by slice while the engine runs
(iter_batch, with async scheduling): the first step starts before the last prompt is validated,
the tokens are those of queuing everything first, and a bad prompt or an early stop ends the
whole batch, leaving nothing in the engine."""

from __future__ import annotations

import random

import pytest

from folovllm import LLM, SamplingParams
from folovllm.engine import llm_engine as llm_engine_module

BUDGET = 32  # tokens a step; a slice is BATCH_ADMIT_BUDGETS budgets of prompt tokens
PROMPT_LEN = 20


def make_llm(path, async_scheduling: bool) -> LLM:
    return LLM(path, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=BUDGET, block_size=8,
               async_scheduling=async_scheduling)


def prompts(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1, 200) for _ in range(PROMPT_LEN)]} for _ in range(count)]


def queued_at_each_step(engine) -> list[int]:
    """Record, at every schedule() call, how many requests the scheduler has been given so far."""
    scheduler = engine.engine_core.scheduler
    inner, seen, given = scheduler.schedule, [], set()

    def schedule():
        given.update(scheduler.requests)
        seen.append(len(given))
        return inner()
    scheduler.schedule = schedule
    return seen


@pytest.fixture(scope="module")
def staged(tiny_models):
    return make_llm(tiny_models["qwen3"][0], async_scheduling=True)


def test_slices_are_queued_between_steps_and_tokens_match_queuing_all_first(tiny_models, staged):
    batch = prompts(20)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    per_slice = -(-llm_engine_module.BATCH_ADMIT_BUDGETS * BUDGET // PROMPT_LEN)  # prompts per slice
    assert per_slice < len(batch)
    seen = queued_at_each_step(staged.llm_engine)
    outs = staged.generate(batch, params, use_tqdm=False)
    # the first step ran with one slice queued; the batch's last prompt came in a later step
    assert seen[0] == per_slice
    assert seen[-1] == len(batch) and seen.index(len(batch)) > 0
    # the reference: the same engine settings without async scheduling queue the whole batch first
    reference = make_llm(tiny_models["qwen3"][0], async_scheduling=False)
    seen_ref = queued_at_each_step(reference.llm_engine)
    ref = reference.generate(batch, params, use_tqdm=False)
    assert seen_ref[0] == len(batch)
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in batch]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]


def _engine_is_empty(engine, free_blocks: int) -> None:
    assert not engine.has_unfinished_requests()
    assert not engine.output_processor.states
    kv = engine.engine_core.scheduler.kv_cache_manager
    assert not kv.req_to_blocks
    assert kv.num_free_blocks == free_blocks


def test_a_bad_prompt_in_a_later_slice_ends_the_whole_batch(staged):
    batch = prompts(20, seed=1)
    batch[15] = {"prompt_token_ids": [5, 6.5]}
    free = staged.llm_engine.engine_core.scheduler.kv_cache_manager.num_free_blocks
    seen = queued_at_each_step(staged.llm_engine)
    with pytest.raises(ValueError, match="prompt token 1 is 6.5"):
        staged.generate(batch, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert seen and seen[0] < 15  # steps had run before the bad prompt was reached
    _engine_is_empty(staged.llm_engine, free)
    # and the engine serves the next batch
    outs = staged.generate(prompts(3), SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 2 for o in outs)


def test_a_consumer_that_stops_early_aborts_the_batch(staged):
    engine = staged.llm_engine
    free = engine.engine_core.scheduler.kv_cache_manager.num_free_blocks
    ids, outputs = engine.iter_batch(prompts(20, seed=2), SamplingParams(max_tokens=4, ignore_eos=True),
                                     stream=True)
    assert len(ids) == 20 and len(set(ids)) == 20
    first = next(outputs)
    assert first.request_id in ids
    outputs.close()
    _engine_is_empty(engine, free)


def test_generate_batch_goes_through_the_slices(tiny_models):
    from folovllm import LLMEngine, ModelConfig, SchedulerConfig
    engine = LLMEngine(ModelConfig(tiny_models["qwen3"][0], max_model_len=64),
                       scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=BUDGET,
                                                        async_scheduling=True), device="cpu")
    seen = queued_at_each_step(engine)
    out = engine.generate_batch(prompts(20, seed=3), SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out) == 20 and all(len(o.outputs[0].token_ids) == 3 for o in out.values())
    assert seen[0] < 20 and seen[-1] == 20


def test_an_interrupted_generate_ends_its_batch_even_if_the_traceback_is_kept(staged, monkeypatch):
    """A KeyboardInterrupt in LLM.generate's loop (here from its progress bar) whose traceback the
    caller keeps, as an interactive session does: the batch still ends at once."""
    import folovllm.entrypoints.llm as llm_module

    class Bar:
        def __init__(self, *a, **k):
            self.format_dict = {"elapsed": 1.0}

        def update(self, n):
            raise KeyboardInterrupt

        def set_postfix_str(self, *a, **k):
            pass

        def close(self):
            pass

    engine = staged.llm_engine
    free = engine.engine_core.scheduler.kv_cache_manager.num_free_blocks
    monkeypatch.setattr(llm_module, "tqdm", Bar)
    kept = None
    try:
        staged.generate(prompts(20, seed=4), SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    except KeyboardInterrupt as e:
        kept = e  # holds the traceback, and with it the frames of generate
    assert kept is not None and kept.__traceback__ is not None
    _engine_is_empty(engine, free)


def test_parallel_sampling_through_the_slices(tiny_models, staged):
    """n = 3 sequences per prompt, the batch spread over slices: each greedy sequence repeats the
    n = 1 tokens, and a seeded sampled batch gives the same tokens as the batch queued whole."""
    batch = prompts(12, seed=5)
    greedy = staged.generate(batch, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, n=3),
                             use_tqdm=False)
    single = staged.generate(batch, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                             use_tqdm=False)
    for many, one in zip(greedy, single):
        assert [c.index for c in many.outputs] == [0, 1, 2]
        assert all(c.token_ids == one.outputs[0].token_ids for c in many.outputs)
    sampled = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True, n=3, seed=7)
    seen = queued_at_each_step(staged.llm_engine)
    staged_out = staged.generate(batch, sampled, use_tqdm=False)
    assert seen[0] < len(batch) * 3  # the 36 sequences did not all come in the first slice
    reference = make_llm(tiny_models["qwen3"][0], async_scheduling=False)
    ref = reference.generate(batch, sampled, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in staged_out] == [[c.token_ids for c in o.outputs] for o in ref]
