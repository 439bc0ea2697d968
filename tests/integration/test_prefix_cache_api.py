"""The prefix cache as a user sees it: RequestOutput.num_cached_tokens, a per-request cache_salt
that keeps requests with other salts from sharing blocks, and reset_prefix_cache(). Counts are
hand-derived: a hit covers whole blocks and never the prompt's last token, so a 21-token prompt
with 8-token blocks can be served floor(20 / 8) * 8 = 16 tokens."""

from __future__ import annotations

import pytest

from folovllm import LLM, SamplingParams

PROMPT = list(range(40, 61))  # 21 tokens
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def run(llm, **extra):
    [out] = llm.generate([{"prompt_token_ids": PROMPT, **extra}], GREEDY, use_tqdm=False)
    return out


def test_cached_tokens_salts_and_reset(tiny_models):
    llm = LLM(tiny_models["qwen3"][0], device="cpu", block_size=8, enable_prefix_caching=True)
    first = run(llm)
    assert first.num_cached_tokens == 0
    again = run(llm)
    assert again.num_cached_tokens == 16
    assert again.outputs[0].token_ids == first.outputs[0].token_ids  # a hit changes nothing
    assert run(llm, cache_salt="tenant-a").num_cached_tokens == 0     # another salt: no sharing
    assert run(llm, cache_salt="tenant-a").num_cached_tokens == 16
    assert run(llm, cache_salt="tenant-b").num_cached_tokens == 0
    assert llm.reset_prefix_cache() is True
    after = run(llm)
    assert after.num_cached_tokens == 0 and after.outputs[0].token_ids == first.outputs[0].token_ids
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        run(llm, cache_salt=5)


def test_reset_is_refused_while_blocks_are_in_use(tiny_models):
    llm = LLM(tiny_models["qwen2"][0], device="cpu", block_size=8, enable_prefix_caching=True)
    engine = llm.llm_engine
    engine.add_request("r", {"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.0, max_tokens=50))
    engine.step()
    assert llm.reset_prefix_cache() is False
    engine.abort_request("r")
    assert llm.reset_prefix_cache() is True


def test_without_prefix_caching_nothing_is_cached(tiny_models):
    llm = LLM(tiny_models["qwen3"][0], device="cpu", block_size=8, enable_prefix_caching=False)
    run(llm)
    assert run(llm).num_cached_tokens == 0
