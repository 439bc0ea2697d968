"""Tensor parallelism on two GPUs (NCCL, one rank per GPU) against one GPU.

- float32, tiny Qwen3 (tied embeddings, q/k norms) and tiny Llama (untied): the greedy and seeded
  tokens of tensor_parallel_size=2 are those of tensor_parallel_size=1, with CUDA graphs (the
  all-reduces captured inside them) and without. In float32 the only difference between the two
  is the order in which the halves of each row-parallel matmul are summed, far below what could
  move a token of these models.
- bfloat16, a larger random Qwen3: at least 95% top-1 agreement over 256 greedy tokens, scored
  teacher-forced (the one-GPU engine's top-1 at every position of the two-GPU engine's sequence),
  so one near-tie that flips does not count against every later token.

Engines use a fixed, small KV cache (each would otherwise size its cache to 90% of its GPU) and
are freed before the next one starts. The workers are spawned processes running
folovllm.executor.multiproc.run_worker: they import folovllm, not this module, and pytest's own
entry point is guarded, so nothing here needs an `if __name__ == "__main__":` guard (as in
tests/integration/test_tensor_parallel.py).

Run on a machine with two GPUs:  python3 -m pytest -q tests/gpu/test_tensor_parallel_gpu.py
"""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import build_tiny_model
from folovllm import LLM, SamplingParams
from folovllm.executor.multiproc import MultiprocExecutor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


def make(path: str, tp: int, enforce_eager: bool, dtype: str, **kw) -> LLM:
    # max_num_seqs 8: decode graphs for 1, 2, 4 and 8 requests, so a batch of 3, 5, 6 or 7
    # replays a padded graph; a budget of 64 tokens makes the longest prompt a chunked prefill.
    kw = dict(dict(max_model_len=256, num_gpu_blocks_override=128, max_num_seqs=8, max_num_batched_tokens=64), **kw)
    return LLM(path, device="cuda", dtype=dtype, attention_backend="triton", tensor_parallel_size=tp,
               enforce_eager=enforce_eager, **kw)


def free(llm: LLM) -> None:
    """Stop the engine (and its workers) and give its GPU memory back before the next one."""
    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def check_layout(llm: LLM, tp: int, enforce_eager: bool) -> None:
    """The engine runs `tp` ranks, and every rank captured CUDA graphs unless told not to."""
    executor = llm.llm_engine.engine_core.executor
    if tp > 1:
        assert isinstance(executor, MultiprocExecutor) and len(executor.pids) == tp
    for rank, times in enumerate(executor.collective_rpc("get_startup_times")):
        assert ("cuda_graphs" in times) == (not enforce_eager), f"rank {rank} start-up phases: {sorted(times)}"


def run(llm: LLM, prompts: list[list[int]], params) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


# ---- float32: the same tokens ----------------------------------------------------------------

def tiny_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    lengths = [3, 21, 1, 11, 150, 40]  # 150: three chunks of the 64-token budget
    return [torch.randint(3, 320, (n,), generator=gen).tolist() for n in lengths]


# Different lengths: requests finish at different steps, so the decode batch shrinks 6 -> 1 and
# passes through padded graph sizes.
MAX_TOKENS = [8, 24, 16, 32, 12, 20]
GREEDY = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
SEEDED = [SamplingParams(temperature=1.0, top_p=0.9, seed=7 + i, max_tokens=n, ignore_eos=True)
          for i, n in enumerate(MAX_TOKENS)]


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda_graphs", "eager"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tp2_gives_the_tokens_of_tp1_in_float32(tiny_models, arch, enforce_eager):
    path = tiny_models[arch][0]
    prompts = tiny_prompts()
    want = {}
    for tp in (1, 2):
        llm = make(path, tp, enforce_eager, "float32")
        check_layout(llm, tp, enforce_eager)
        got = run(llm, prompts, GREEDY), run(llm, prompts, SEEDED)
        free(llm)
        if tp == 1:
            want = got
            assert [len(t) for t in want[0]] == MAX_TOKENS
            continue
        assert got[0] == want[0], "greedy tokens differ between TP=2 and TP=1"
        # Every rank samples with the same per-request generators; a rank whose tokens drifted
        # would feed different inputs into the next step's all-reduces.
        assert got[1] == want[1], "seeded tokens differ between TP=2 and TP=1"


# ---- bfloat16: top-1 agreement -----------------------------------------------------------------

N_PROMPTS, N_NEW = 8, 32  # 256 generated tokens


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    # 8 query heads and 2 KV heads: 4 and 1 per rank; intermediate 512 and vocab 2048 split in two.
    path = tmp_path_factory.mktemp("tp-qwen3-bf16")
    build_tiny_model(path, "qwen3", vocab_size=2048, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                     max_position_embeddings=4096, initializer_range=0.05)
    return str(path)


def test_tp2_bf16_agrees_with_tp1_teacher_forced(bf16_model_dir):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 300, (N_PROMPTS,), generator=gen).tolist()
    prompts = [torch.randint(3, 2048, (n,), generator=gen).tolist() for n in lengths]
    engine_kw = dict(max_model_len=1024, num_gpu_blocks_override=512, max_num_seqs=32, max_num_batched_tokens=2048)

    two = make(bf16_model_dir, 2, False, "bfloat16", **engine_kw)
    check_layout(two, 2, enforce_eager=False)
    ours = run(two, prompts, SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True))
    free(two)
    assert [len(t) for t in ours] == [N_NEW] * N_PROMPTS

    # The one-GPU engine's greedy next token after every prefix of each TP=2 sequence: one
    # request per generated position, each the prompt plus the TP=2 tokens before it.
    one = make(bf16_model_dir, 1, False, "bfloat16", **engine_kw)
    contexts = [p + toks[:i] for p, toks in zip(prompts, ours) for i in range(N_NEW)]
    ref = [t[0] for t in run(one, contexts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))]
    free(one)

    flat = [t for toks in ours for t in toks]
    agree = sum(a == b for a, b in zip(flat, ref))
    assert len(flat) == len(ref) == N_PROMPTS * N_NEW
    # A broken shard or all-reduce gives chance agreement (about 1 in 2048), not a few flips.
    assert agree / len(flat) >= 0.95, f"top-1 agreement {agree}/{len(flat)}"
