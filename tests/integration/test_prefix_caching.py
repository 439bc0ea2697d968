"""Prefix caching end to end (greedy, float32, CPU): the same tokens with the cache on as with it
off, under chunk budgets of 1, 7, 16 and 64 tokens and under forced preemption; the hit and query
counters the server's metrics read; a freed cached block served to a later request; eviction
least recently used first; every reference dropped at the end. And the defaults: on for the
engine, off for `bench throughput` and `bench latency` unless asked for.

The reference is the engine with the cache off and a budget that takes every prompt whole, which
test_models_vs_hf.py holds to transformers. Block size 8 throughout: a prompt of L tokens can be
served floor((L - 1) / 8) * 8 tokens."""

from __future__ import annotations

import pytest

from folovllm import LLM, SamplingParams
from folovllm.entrypoints.cli import build_parser

from engine_internals import (assert_idle, block_ids_of, block_ref_counts, cached_prefix_tokens,
                              prefix_cache_counters, scheduler_of)

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SHARED = [list(range(20, 44)), list(range(100, 117))]  # 24 and 17 tokens
# Prompts that share prefixes (whole blocks, part of a block, a whole prompt), one a multiple of
# the block size, one of a single block's length, and one shared with nobody.
PROMPTS = [SHARED[0] + [7, 8, 9], SHARED[0] + [10, 11], SHARED[0], SHARED[1] + [5] * 7, SHARED[1] + [6],
           SHARED[0][:8], SHARED[0] + [7, 8, 9], list(range(200, 213))]


def make(path, caching: bool, **kw) -> LLM:
    kw = dict(dict(block_size=8, max_num_seqs=4, max_model_len=64), **kw)
    return LLM(path, device="cpu", enable_prefix_caching=caching, **kw)


def tokens(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                         use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(tiny_models):
    return tokens(make(tiny_models["qwen3"][0], False))


@pytest.mark.parametrize("caching", [True, False], ids=["cache", "nocache"])
@pytest.mark.parametrize("budget", [1, 7, 16, 64])
def test_same_tokens_under_any_chunk_budget(tiny_models, reference, budget, caching):
    """Twice in a row: the second run finds every prompt's full blocks in the cache."""
    llm = make(tiny_models["qwen3"][0], caching, max_num_batched_tokens=budget)
    assert tokens(llm) == reference
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    served = [o.num_cached_tokens for o in outs]
    assert served == ([(len(p) - 1) // 8 * 8 for p in PROMPTS] if caching else [0] * len(PROMPTS))
    assert_idle(llm)


def test_same_tokens_with_a_long_prefill_threshold(tiny_models, reference):
    """Each prompt capped at 5 tokens a step (budget 64): the same tokens, in more steps."""
    llm = make(tiny_models["qwen3"][0], True, max_num_batched_tokens=64, long_prefill_token_threshold=5)
    assert tokens(llm) == reference
    assert_idle(llm)


@pytest.mark.parametrize("caching", [True, False], ids=["cache", "nocache"])
def test_same_tokens_under_forced_preemption(tiny_models, reference, caching):
    """8 blocks of 8 tokens hold one 64-token request, not four 30-odd-token ones decoding: requests
    are preempted and recomputed (from their own cached blocks, when the cache is on)."""
    llm = make(tiny_models["qwen3"][0], caching, num_gpu_blocks_override=8, max_num_batched_tokens=16)
    assert tokens(llm) == reference
    assert scheduler_of(llm).num_preemptions > 0
    assert_idle(llm)


def test_hit_and_query_counters(tiny_models):
    """One request at a time: a 27-token prompt (3 full blocks; 24 cacheable), the same again
    (24 served), a 26-token prompt sharing its first 24 tokens (24 served), and a 13-token prompt
    sharing nothing."""
    llm = make(tiny_models["qwen3"][0], True)
    a = SHARED[0] + [7, 8, 9]
    expected = [(27, 0), (27, 24), (26, 24), (13, 0)]
    queries = hits = 0
    for prompt, (q, h) in zip([a, a, SHARED[0] + [10, 11], list(range(200, 213))], expected):
        [out] = llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)
        queries, hits = queries + q, hits + h
        assert out.num_cached_tokens == h
        assert prefix_cache_counters(llm) == (queries, hits)


def test_a_freed_cached_block_serves_a_later_request(tiny_models):
    llm = make(tiny_models["qwen3"][0], True)
    engine = llm.llm_engine
    engine.add_request("first", {"prompt_token_ids": PROMPTS[0]}, GREEDY)
    engine.step()
    first_blocks = block_ids_of(llm, "first")
    list(engine.iter_outputs(["first"]))
    assert all(n == 0 for n in block_ref_counts(llm))  # freed, but still cached
    engine.add_request("later", {"prompt_token_ids": PROMPTS[1]}, GREEDY)
    engine.step()
    later_blocks = block_ids_of(llm, "later")
    assert later_blocks[:3] == first_blocks[:3]  # SHARED[0]: three full blocks, the same ones
    assert [block_ref_counts(llm)[b] for b in later_blocks[:3]] == [1, 1, 1]
    list(engine.iter_outputs(["later"]))
    assert_idle(llm)


def test_eviction_takes_the_least_recently_used_blocks_first(tiny_models):
    """A pool of 12 blocks. A, B, C (24 tokens = 3 blocks each, one output) run one after the
    other and are freed: the free queue is the 3 unused blocks, then A's, B's, C's. D (48 tokens,
    6 blocks) takes the 3 unused and A's 3: A's prefix is gone, B's and C's (16 tokens each: at
    most 2 blocks can be served of a 24-token prompt) remain."""
    llm = make(tiny_models["qwen3"][0], True, num_gpu_blocks_override=12)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    a, b, c = (list(range(s, s + 24)) for s in (20, 60, 100))
    for prompt in (a, b, c):
        llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)
    assert [cached_prefix_tokens(llm, p) for p in (a, b, c)] == [16, 16, 16]
    llm.generate([{"prompt_token_ids": list(range(150, 198))}], one, use_tqdm=False)
    assert [cached_prefix_tokens(llm, p) for p in (a, b, c)] == [0, 16, 16]
    assert_idle(llm)


def test_prefix_caching_is_on_by_default_and_off_for_the_repeating_benchmarks(tiny_models):
    assert LLM(tiny_models["qwen3"][0], device="cpu").llm_engine.config.cache_config.enable_prefix_caching
    parser = build_parser()
    for bench in ("throughput", "latency"):
        assert parser.parse_args(["bench", bench]).enable_prefix_caching is False
        assert parser.parse_args(["bench", bench, "--enable-prefix-caching"]).enable_prefix_caching is True
    assert parser.parse_args(["generate"]).enable_prefix_caching is True
    assert parser.parse_args(["generate", "--no-enable-prefix-caching"]).enable_prefix_caching is False
