"""The CPU KV cache is allocated, not zeroed (model_runner.initialize_kv_cache): every path the
torch backend takes on CPU must read only slots some step has written. Each test fills the whole
cache with NaN before the first request and runs a workload that takes one of those paths; a
single read of an unwritten slot (even a masked one: softmax weight 0 times NaN) makes NaN
logits and so other tokens than the same engine gives over a zeroed cache."""

from __future__ import annotations

import pytest
import torch

from folovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _runner(llm):
    return llm.llm_engine.engine_core.executor.driver_worker.model_runner


def _fill(llm, value: float):
    for layer in _runner(llm).attn_layers:
        layer.kv_cache.fill_(value)
    return llm


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def _both(path, prompts, params, **kwargs):
    """(tokens over a zeroed cache, the outputs over a NaN cache, the NaN engine)."""
    want = _tokens(_fill(LLM(path, device="cpu", **kwargs), 0.0).generate(prompts, params, use_tqdm=False))
    llm = _fill(LLM(path, device="cpu", **kwargs), float("nan"))
    return want, llm.generate(prompts, params, use_tqdm=False), llm


def _ids(lengths, start=3):
    return [{"prompt_token_ids": [start + (7 * i + j) % 300 for j in range(n)]} for i, n in enumerate(lengths)]


def test_the_runner_does_not_zero_the_cpu_cache(tiny_models, monkeypatch):
    """What the other tests rely on: the cache comes from torch.empty on CPU (had it been zeroed,
    they would test nothing about the runner)."""
    calls = []
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: calls.append(a) or real(*a, **k))
    llm = LLM(tiny_models["qwen2"][0], device="cpu", num_gpu_blocks_override=8, block_size=8, max_model_len=64)
    shapes = [tuple(layer.kv_cache.shape) for layer in _runner(llm).attn_layers]
    assert shapes and all(s in [tuple(a[0]) for a in calls if a and isinstance(a[0], tuple)] for s in shapes)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_chunked_prefill_beside_decodes(tiny_models, dtype):
    """Prompts longer than the step's budget are split over steps while other requests decode:
    each chunk reads the chunks before it, decode rows of different context lengths are padded."""
    prompts = _ids([45, 3, 30, 1, 19])
    want, got, _ = _both(tiny_models["llama"][0], prompts, GREEDY, dtype=dtype, block_size=8, max_num_seqs=8,
                         enable_chunked_prefill=True, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert _tokens(got) == want


def test_prefix_cache_hits_in_the_same_step_and_later(tiny_models):
    """Requests that share 3 blocks of prompt: the later ones read blocks an earlier request
    computes in the same step, and a second batch reads them from the cache."""
    shared = list(range(10, 34))  # 3 blocks of 8
    prompts = [{"prompt_token_ids": shared + tail} for tail in ([40], [41, 42, 43], [44] * 9, [])]
    want, got, llm = _both(tiny_models["qwen2"][0], prompts, GREEDY, block_size=8, enable_prefix_caching=True)
    assert _tokens(got) == want
    assert [o.num_cached_tokens for o in got] == [0, 24, 24, 16]  # the last one recomputes its last block
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(again) == want and all(o.num_cached_tokens >= 16 for o in again)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_and_recompute(tiny_models, async_scheduling):
    """A pool too small for the batch: requests are preempted, their blocks go to others, and
    they are recomputed into blocks that may never have been written."""
    prompts = _ids([20, 11, 25, 7, 18, 30, 14, 9])
    want, got, llm = _both(tiny_models["qwen3"][0], prompts, GREEDY, block_size=8, max_model_len=64,
                           num_gpu_blocks_override=10, async_scheduling=async_scheduling)
    assert llm.llm_engine.engine_core.scheduler.num_preemptions > 0
    assert _tokens(got) == want


def test_parallel_sampling_copies_the_last_prompt_block(tiny_models):
    """n > 1: the children share the prompt's full blocks and get a copy of its partial last
    block, whose slots past the prompt were never written."""
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=10, ignore_eos=True)
    want, got, _ = _both(tiny_models["qwen2"][0], _ids([13, 5]), params, block_size=8)
    assert _tokens(got) == want and all(len(set(map(tuple, t))) > 1 for t in want)  # the samples differ
