"""Request timings: time to first token counts from the request's arrival, so it includes the time
spent waiting to be scheduled. Bounds come from the test's own clock (time.monotonic, the clock of
arrival_time) read around the engine calls."""

from __future__ import annotations

import time

import pytest

from folovllm import LLM, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_models) -> LLMEngine:
    # One request at a time: a second request waits in the queue until the first finishes.
    return LLM(tiny_models["qwen3"][0], device="cpu", max_model_len=64, block_size=8, max_num_seqs=1).llm_engine


def params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def run_to_end(engine: LLMEngine) -> dict[str, tuple[object, float]]:
    """Step until idle: request id -> (final output, the test's clock right after the step that
    returned it)."""
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = (out, time.monotonic())
    return final


def test_ttft_counts_from_an_arrival_in_the_past(engine):
    arrival = time.monotonic() - 100.0
    before = time.monotonic()
    engine.add_request("past", {"prompt_token_ids": [5, 6, 7]}, params(3), arrival_time=arrival)
    out, done = run_to_end(engine)["past"]
    m = out.metrics
    assert m.arrival_time == arrival
    # The first token came after the request was added and before the run ended.
    assert before - arrival <= m.time_to_first_token <= done - arrival
    assert m.time_to_first_token >= 100.0
    assert arrival < m.first_scheduled_time <= m.first_token_time <= m.finished_time <= done


def test_ttft_includes_the_wait_behind_another_request(engine):
    """With max_num_seqs=1, "b" is scheduled only once "a" has finished: b's first token comes
    after a's final output, so b's TTFT is at least the time from b's arrival to then."""
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, params(24))
    engine.add_request("b", {"prompt_token_ids": [8, 9]}, params(2))
    added = time.monotonic()
    final = run_to_end(engine)
    (a, a_done), (b, b_done) = final["a"], final["b"]
    wait = a_done - added
    assert b.metrics.first_scheduled_time >= a.metrics.finished_time
    assert b.metrics.time_to_first_token >= wait > 0
    assert b.metrics.time_to_first_token <= b_done - b.metrics.arrival_time
