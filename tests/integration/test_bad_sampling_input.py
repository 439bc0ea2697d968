"""A bad SamplingParams is rejected before the engine runs anything, and the engine carries on."""

from __future__ import annotations

import pytest

from folovllm import LLM, SamplingParams

GOOD = {"prompt_token_ids": [5, 6, 7, 8]}
MAX_SEED = 2**64 - 1


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["qwen3"][0], max_model_len=64)


def finishes_normally(llm, params: SamplingParams) -> list[int]:
    [out] = llm.generate([GOOD], params, use_tqdm=False)
    assert out.finished and out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == params.max_tokens
    return list(out.outputs[0].token_ids)


@pytest.mark.parametrize("bad", [dict(seed="abc"), dict(seed=1.5), dict(seed=2**64), dict(max_tokens="5"),
                                 dict(temperature=float("nan")), dict(stop_token_ids=[1.5])],
                         ids=lambda kw: f"{next(iter(kw))}={next(iter(kw.values()))!r}")
def test_bad_params_in_a_batch_are_rejected_before_anything_runs(llm, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} "):
        llm.generate([GOOD, GOOD], [SamplingParams(max_tokens=3), SamplingParams(**bad)], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    finishes_normally(llm, SamplingParams(max_tokens=3, ignore_eos=True))


def test_largest_seed_samples_and_repeats(llm):
    params = SamplingParams(temperature=1.0, seed=MAX_SEED, max_tokens=8, ignore_eos=True)
    first = finishes_normally(llm, params)
    assert first == finishes_normally(llm, params)
    # alongside unseeded and greedy requests in one batch, it gives the same tokens
    outs = llm.generate([GOOD] * 3, [SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True), params,
                                     SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)],
                        use_tqdm=False)
    assert list(outs[1].outputs[0].token_ids) == first


def test_field_reassigned_after_construction_is_rejected(tiny_models):
    llm = LLM(tiny_models["qwen3"][0], max_model_len=64)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=3)
    params.seed = "abc"
    with pytest.raises(ValueError, match=r"SamplingParams\.seed "):
        llm.generate([GOOD, GOOD], [SamplingParams(max_tokens=3), params], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    finishes_normally(llm, SamplingParams(max_tokens=3, ignore_eos=True))


@pytest.mark.parametrize("ids, message", [
    ([5.7, 6.2], "prompt token 0 is 5.7"), ([True, 6], "prompt token 0 is True"), (["x"], "prompt token 0 is 'x'"),
    ("not a list", "prompt_token_ids must be a list"),
])
def test_token_id_prompts_are_checked_and_nothing_is_left_queued(tiny_models, ids, message):
    """A bad token id in the second prompt of a batch: a clear error, and the first prompt is
    withdrawn (all or none), so nothing is left in the engine."""
    llm = LLM(tiny_models["qwen3"][0], max_model_len=64)
    with pytest.raises(ValueError, match=message):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": ids}], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert not llm.llm_engine.output_processor.states


def test_a_number_too_large_for_a_float_is_a_value_error():
    with pytest.raises(ValueError, match="SamplingParams.temperature must be a finite number"):
        SamplingParams(temperature=10**400)
