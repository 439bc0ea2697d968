"""FoloVLLM against Hugging Face transformers on the same random weights (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from folovllm import LLM, SamplingParams

ARCHS = ["qwen3", "qwen2", "llama"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_prompts(lengths, seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def as_inputs(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.mark.parametrize("arch", ARCHS)
def test_single_request_greedy_matches_hf(tiny_models, arch):
    path, hf = tiny_models[arch]
    llm = LLM(path)
    [prompt] = random_prompts([9], seed=1)
    [out] = llm.generate(as_inputs([prompt]), GREEDY, use_tqdm=False)
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)
    assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_mixed_lengths_matches_hf(tiny_models, arch):
    """Prefill and decode rows of different requests share steps; each must still see only its
    own context."""
    path, hf = tiny_models[arch]
    llm = LLM(path, max_num_seqs=8)
    prompts = random_prompts([3, 17, 40, 5, 64, 1], seed=2)
    outs = llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_hf(tiny_models, arch):
    path, hf = tiny_models[arch]
    llm = LLM(path)
    engine = llm.llm_engine
    [prompt] = random_prompts([33], seed=3)
    engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))
    runner = engine.engine_core.executor.driver_worker.model_runner
    engine.engine_core.process_inbox()
    hidden, _ = runner.forward(engine.engine_core.scheduler.schedule())
    with torch.inference_mode():
        ours = runner.model.compute_logits(hidden)
        ref = hf(torch.tensor([prompt])).logits[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_chunked_prefill_matches_hf(tiny_models):
    """A token budget of 16 splits every prompt over several steps."""
    path, hf = tiny_models["qwen3"]
    llm = LLM(path, max_num_batched_tokens=16, max_num_seqs=4)
    prompts = random_prompts([50, 23, 9], seed=4)
    outs = llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_block_sizes_match_hf(tiny_models, block_size):
    path, hf = tiny_models["llama"]
    llm = LLM(path, block_size=block_size)
    prompts = random_prompts([31, 6], seed=5)
    outs = llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


def test_preemption_gives_same_tokens_and_frees_every_block(tiny_models):
    """8 requests need up to 8 x 5 blocks of 8 tokens; a pool of 10 blocks forces preemption."""
    path, hf = tiny_models["qwen2"]
    prompts = random_prompts([20, 11, 25, 7, 18, 30, 14, 9], seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    roomy = LLM(path, block_size=8, max_model_len=64)
    expected = [o.outputs[0].token_ids for o in roomy.generate(as_inputs(prompts), params, use_tqdm=False)]

    tight = LLM(path, block_size=8, max_model_len=64, num_gpu_blocks_override=10)
    outs = tight.generate(as_inputs(prompts), params, use_tqdm=False)
    sched = tight.llm_engine.engine_core.scheduler
    assert sched.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert expected[0] == hf_greedy(hf, prompts[0], 10)
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_blocks
    assert all(b.ref_cnt == 0 for b in pool.blocks)
