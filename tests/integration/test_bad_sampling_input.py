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
