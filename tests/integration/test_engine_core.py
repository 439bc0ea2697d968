"""EngineCore as the server will use it: stepped by a background thread while another thread adds
and aborts requests; and one request's failure inside a step ends that request alone."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm.engine.core import EngineCore


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def assert_all_free(core: EngineCore) -> None:
    pool = core.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_blocks
    assert not core.executor.driver_worker.model_runner.input_batch.req_id_to_index


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_core_stepped_by_a_background_thread(tiny_models, async_scheduling):
    """A thread steps the core in a loop (as the server will); the test thread adds requests one by
    one while steps run, and aborts one of them. Every other request gets transformers' greedy
    tokens; the aborted one gets no finish and no output after the abort is applied."""
    path, hf = tiny_models["qwen3"]
    llm = LLM(path, device="cpu", max_num_seqs=3, max_num_batched_tokens=16, block_size=8,
              async_scheduling=async_scheduling)
    engine = llm.llm_engine
    core = engine.engine_core
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    inputs = prompts(6, seed=4)
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    failure: list[BaseException] = []

    produced = {"victim": 0}  # the victim's tokens the core has put out so far

    def loop():
        try:
            while not stop.is_set():
                for co in core.step().outputs:
                    if co.req_id == "victim":
                        produced["victim"] += len(co.new_token_ids)
                    outputs.put(co)
                time.sleep(0.0005)
        except BaseException as e:  # surfaced in the test thread
            failure.append(e)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    try:
        core.add_request(engine.processor.process("victim", {"prompt_token_ids": inputs[0]}, long))
        for i, prompt in enumerate(inputs[1:], 1):
            core.add_request(engine.processor.process(str(i), {"prompt_token_ids": prompt}, params))
            time.sleep(0.01)
        deadline = time.monotonic() + 60
        aborted_at = None
        while len(finished) < len(inputs) - 1 and time.monotonic() < deadline and not failure:
            try:
                co = outputs.get(timeout=0.1)
            except queue.Empty:
                continue
            tokens.setdefault(co.req_id, []).extend(co.new_token_ids)
            if co.finish_reason is not None:
                finished[co.req_id] = co.finish_reason
            if aborted_at is None and len(tokens.get("victim", [])) >= 3:
                aborted_at = produced["victim"]  # read before the abort is queued
                core.abort_requests(["victim"])
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not failure, failure
    assert not thread.is_alive()
    assert sorted(finished) == [str(i) for i in range(1, len(inputs))]
    assert set(finished.values()) == {"length"}
    for i, prompt in enumerate(inputs[1:], 1):
        assert tokens[str(i)] == hf_greedy(hf, prompt, 10), i
    # The abort took effect: the victim never finished, and the core put out at most two more of
    # its tokens (the step being processed, and one in flight) after the abort was queued.
    assert aborted_at is not None and "victim" not in finished
    assert len(tokens["victim"]) <= aborted_at + 2
    core.step()
    core.step()
    assert not core.has_unfinished_requests()
    assert_all_free(core)


def _run(engine, sabotage=None) -> list:
    """Four greedy requests, streamed (so the detokenizer runs every step); `sabotage(ids)` may
    break one of them after they are queued."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ids = [engine.add_request(None, {"prompt_token_ids": p}, params) for p in prompts(4, seed=7)]
    if sabotage:
        sabotage(ids[0])
    final = {o.request_id: o for o in engine.iter_outputs(ids) if o.finished}
    return [final[i] for i in ids]


@pytest.mark.parametrize("where", ["detokenizer", "stop_check"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_error_in_one_request_ends_it_alone(tiny_models, monkeypatch, where, async_scheduling):
    """Processing one request raises (its detokenizer, or the scheduler's stop check) from its 3rd
    token on: that request ends with finish_reason 'error' and the tokens it had; the others
    finish with exactly the tokens of a clean run, and every block is free again."""
    path, _ = tiny_models["qwen3"]
    engine = LLM(path, device="cpu", max_num_seqs=4, async_scheduling=async_scheduling).llm_engine
    clean = _run(engine)

    def break_detokenizer(victim):
        state = engine.output_processor.states[victim]
        update = state.detokenizer.update

        def failing(new_ids):
            if len(state.output_token_ids) >= 3:
                raise RuntimeError("a broken detokenizer")
            return update(new_ids)
        state.detokenizer.update = failing

    def break_stop_check(victim):
        scheduler = engine.engine_core.scheduler
        check = scheduler._check_stop

        def failing(request, token_id):
            if request.request_id == victim and request.num_output_tokens >= 3:
                raise RuntimeError("a broken stop check")
            return check(request, token_id)
        monkeypatch.setattr(scheduler, "_check_stop", failing)

    outs = _run(engine, break_detokenizer if where == "detokenizer" else break_stop_check)
    victim = outs[0].outputs[0]
    assert outs[0].finished and victim.finish_reason == "error"
    assert len(victim.token_ids) == 3 and victim.token_ids == clean[0].outputs[0].token_ids[:3]
    for ok, ref in zip(outs[1:], clean[1:]):
        assert ok.outputs[0].token_ids == ref.outputs[0].token_ids
        assert ok.outputs[0].finish_reason == "length"
    core = engine.engine_core
    core.step()
    assert not core.has_unfinished_requests()
    assert_all_free(core)


def test_a_step_result_read_by_the_engine_leaves_the_runner_alone(tiny_models):
    """The engine reads a step's output through its future; only the worker records the tokens
    in its own input batch (at its next step), which is what lets the runner live in another
    process."""
    path, _ = tiny_models["qwen3"]
    engine = LLM(path, device="cpu", async_scheduling=True).llm_engine
    core = engine.engine_core
    runner = core.executor.driver_worker.model_runner
    engine.add_request("r", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0.0, max_tokens=4))
    assert core.step().outputs == []          # the prefill is in flight
    _, future = core._in_flight
    result = future.result()
    row = runner.input_batch.req_id_to_index["r"]
    assert result.req_ids == ["r"] and len(result.sampled_token_ids[0]) == 1
    assert runner.input_batch.num_tokens[row] == 3      # not recorded by reading the result
    assert runner.input_batch.num_pending[row] == 1
    core.step()        # step 2 takes that token on the device; the newest step stays unrecorded
    assert runner.input_batch.num_tokens[row] == 3
    core.step()        # the worker records step 1's token itself, at its own later step
    assert runner.input_batch.num_tokens[row] == 4
    assert runner.input_batch.token_ids[row, 3] == result.sampled_token_ids[0][0]


def test_every_rank_sizes_its_cache_and_the_smallest_wins(tiny_models):
    """The executor asks every worker for its block count (a collective call) and the core
    builds the scheduler on the minimum."""
    from folovllm.config import EngineConfig, ModelConfig
    from folovllm.executor.uniproc import UniprocExecutor

    class TwoRanks(UniprocExecutor):  # a second rank that has 5 blocks fewer
        def collective_rpc(self, method, args=(), kwargs=None):
            [result] = super().collective_rpc(method, args, kwargs)
            return [result, result - 5] if method == "determine_num_blocks" else [result, result]

    path, _ = tiny_models["qwen3"]
    config = EngineConfig(ModelConfig(path, max_model_len=64), device="cpu")
    config.cache_config.num_gpu_blocks_override = 40
    core = EngineCore(config, executor_class=TwoRanks)
    assert config.cache_config.num_gpu_blocks == 35
    assert core.scheduler.kv_cache_manager.block_pool.num_blocks == 35
    assert core.executor.driver_worker.model_runner.attn_layers[0].kv_cache.shape[1] == 35


@pytest.mark.parametrize("how", ["stop_token", "abort"])
def test_an_id_reused_at_once_gets_only_its_own_tokens(tiny_models, how):
    """Request 'a' ends (a stop token, or an abort) while a step holding its row is still in
    flight, and a new request takes the id 'a' at once: the late token must reach neither the new
    request's output nor its context in the runner. Reference: transformers' greedy tokens."""
    path, hf = tiny_models["qwen3"]
    engine = LLM(path, device="cpu", async_scheduling=True, max_model_len=64, block_size=8,
                 max_num_seqs=4).llm_engine
    first, second = [5, 6, 7], [40, 41, 42, 43, 44]
    if how == "stop_token":
        stop = hf_greedy(hf, first, 2)[1]
        engine.add_request("a", {"prompt_token_ids": first},
                           SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop]))
        [done] = [o for o in engine.iter_outputs(["a"]) if o.finished]
        assert done.outputs[0].finish_reason == "stop"
    else:
        engine.add_request("a", {"prompt_token_ids": first},
                           SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
        for _ in range(4):
            engine.step()
        engine.abort_request("a")
    assert engine.engine_core._in_flight is not None  # the old 'a' still has a step on the device
    engine.add_request("a", {"prompt_token_ids": second}, SamplingParams(temperature=0.0, max_tokens=4,
                                                                         ignore_eos=True))
    [out] = [o for o in engine.iter_outputs(["a"]) if o.finished]
    assert out.outputs[0].token_ids == hf_greedy(hf, second, 4)
    assert out.metrics.first_scheduled_time is not None
    engine.step()
    engine.step()
    assert_all_free(engine.engine_core)


def test_a_refused_add_fails_that_request_alone(tiny_models):
    """A request the scheduler refuses when the core applies its inbox (here an id the scheduler
    still holds, queued past the engine's own check) ends with finish_reason 'error'; the request
    already running finishes normally."""
    path, hf = tiny_models["qwen3"]
    engine = LLM(path, device="cpu").llm_engine
    core = engine.engine_core
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    core.add_request(engine.processor.process("x", {"prompt_token_ids": [5, 6]}, params))
    core.add_request(engine.processor.process("x", {"prompt_token_ids": [7, 8]}, params))
    reasons, tokens = [], []
    while core.has_work():
        for co in core.step().outputs:
            tokens.extend(co.new_token_ids)
            if co.finish_reason:
                reasons.append(co.finish_reason)
    assert sorted(reasons) == ["error", "length"]
    assert tokens == hf_greedy(hf, [5, 6], 5)
    assert_all_free(core)
