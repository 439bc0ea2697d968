"""Tensor parallelism through the multi-process executor, on CPU over gloo: two (or four) worker
processes give the same greedy (and seeded) tokens as one process, each holds its share of every
sharded layer,
and a worker that dies, an engine that is deleted and an engine process that dies leave no
worker behind."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import build_tiny_model
from folovllm import LLM, SamplingParams
from folovllm.executor.multiproc import MultiprocExecutor, WorkerDiedError

PROMPTS = [[5, 6, 7], list(range(9, 30)), [30], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)


def make(path, tp: int, **kw) -> LLM:
    # A small token budget makes the long prompt a chunked prefill, and async scheduling puts two
    # steps in flight: both paths must reach every rank the same way.
    kw = dict(dict(max_model_len=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=16), **kw)
    return LLM(path, device="cpu", tensor_parallel_size=tp, **kw)


def tokens(llm: LLM, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                         use_tqdm=False)]


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def check_against_one_rank(path, async_scheduling: bool, kv_sharded: bool, tp: int = 2) -> LLM:
    one = make(path, 1, async_scheduling=async_scheduling)
    want_greedy, want_seeded = tokens(one, GREEDY), tokens(one, SEEDED)
    whole = one.llm_engine.engine_core.executor.driver_worker.parameter_bytes()
    one.llm_engine.shutdown()
    two = make(path, tp, async_scheduling=async_scheduling)
    executor = two.llm_engine.engine_core.executor
    assert isinstance(executor, MultiprocExecutor) and len(executor.pids) == tp
    assert tokens(two, GREEDY) == want_greedy
    # Every rank samples, with the same generators: a rank whose tokens drifted would feed the
    # next step's all-reduces different inputs, and rank 0's tokens would stop matching.
    assert tokens(two, SEEDED) == want_seeded
    for shard in executor.parameter_bytes():
        assert shard["replicated"] == whole["replicated"]  # the norms
        if kv_sharded:
            assert shard["sharded"] * tp == whole["sharded"]
        else:  # fewer KV heads than ranks: each KV head's k/v rows sit whole on tp / KVH ranks, q
            # and the rest are split tp ways (and an odd vocabulary gives each rank ceil(V / tp) rows)
            assert whole["sharded"] < shard["sharded"] * tp < whole["sharded"] * 1.25
        assert shard["total"] == shard["sharded"] + shard["replicated"]
    return two


def test_qwen3_tp2_matches_tp1_and_halves_the_sharded_layers(tiny_models):
    # 4 query heads, 2 KV heads (one per rank), q/k norms, tied embeddings; async scheduling.
    llm = check_against_one_rank(tiny_models["qwen3"][0], async_scheduling=True, kv_sharded=True)
    pids = llm.llm_engine.engine_core.executor.pids
    del llm
    gc.collect()  # a deleted engine stops its workers
    assert wait_gone(pids, 5.0) == []


def test_qwen3_tp4_with_fewer_kv_heads_than_ranks_matches_tp1(tiny_models):
    # 4 query heads (one per rank), 2 KV heads (each on two ranks), intermediate 128 and vocab 320
    # split four ways.
    llm = check_against_one_rank(tiny_models["qwen3"][0], async_scheduling=False, kv_sharded=False, tp=4)
    pids = llm.llm_engine.engine_core.executor.pids
    llm.llm_engine.shutdown()
    assert wait_gone(pids, 5.0) == []


def test_llama_untied_tp2_matches_tp1(tiny_models):
    llm = check_against_one_rank(tiny_models["llama"][0], async_scheduling=False, kv_sharded=True)
    pids = llm.llm_engine.engine_core.executor.pids
    llm.llm_engine.shutdown()
    assert wait_gone(pids, 5.0) == []


def test_one_kv_head_is_replicated_and_a_killed_worker_is_a_clear_error(tmp_path):
    path = tmp_path / "qwen3-kv1"
    build_tiny_model(path, "qwen3", num_key_value_heads=1, vocab_size=321)  # odd: the last rank pads
    llm = check_against_one_rank(str(path), async_scheduling=True, kv_sharded=False)
    pids = llm.llm_engine.engine_core.executor.pids
    # Kill rank 1 while a long generation runs: rank 0 is then waiting in a collective for it.
    killed_at = []

    def kill():
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    timer = threading.Timer(0.5, kill)
    timer.start()
    long = SamplingParams(temperature=0, max_tokens=56, ignore_eos=True)
    cause = r"^tensor-parallel worker rank 1 \(pid \d+\) died \(exit code -9, killed by SIGKILL\)"
    with pytest.raises(WorkerDiedError, match=cause):
        for _ in range(100):  # far longer than 0.5 s; the kill ends it
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], long, use_tqdm=False)
    timer.join()
    assert killed_at and time.monotonic() - killed_at[0] < 5.0
    assert wait_gone(pids, 5.0) == []  # rank 0 too: the executor stopped it
    with pytest.raises(WorkerDiedError):  # and the engine stays failed, rather than hanging
        llm.generate([{"prompt_token_ids": [5]}], GREEDY, use_tqdm=False)


def test_workers_exit_when_the_engine_process_dies(tiny_models, tmp_path):
    script = tmp_path / "engine.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from folovllm import LLM, SamplingParams

        if __name__ == "__main__":  # the workers are spawned: they import this file as a module
            llm = LLM({tiny_models["qwen3"][0]!r}, device="cpu", tensor_parallel_size=2, max_model_len=64,
                      block_size=8, max_num_seqs=4)
            llm.generate([{{"prompt_token_ids": [5, 6]}}], SamplingParams(max_tokens=2), use_tqdm=False)
            print("PIDS", *llm.llm_engine.engine_core.executor.pids, flush=True)
            os._exit(0)  # no clean-up at all: only the workers' own parent check can stop them
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("PIDS")]
    assert line, proc.stdout + proc.stderr
    pids = [int(p) for p in line[0].split()[1:]]
    assert len(pids) == 2
    assert wait_gone(pids, 10.0) == []


def test_async_llm_core_process_starts_workers(tiny_models):
    # The engine core runs in a daemonic process of its own there; its workers start all the same.
    import asyncio

    from folovllm import EngineArgs
    from folovllm.engine.async_llm import AsyncLLM

    path = tiny_models["qwen3"][0]
    one = make(path, 1)
    want = tokens(one, GREEDY)[:2]
    one.llm_engine.shutdown()
    engine = AsyncLLM.from_engine_args(EngineArgs.from_kwargs(
        model=path, device="cpu", tensor_parallel_size=2, max_model_len=64, block_size=8, max_num_seqs=4,
        max_num_batched_tokens=16))

    async def run(i: int) -> list[int]:
        async for out in engine.generate({"prompt_token_ids": PROMPTS[i]}, GREEDY, f"r{i}"):
            last = out
        return last.outputs[0].token_ids

    async def both():
        return await asyncio.gather(run(0), run(1))

    try:
        assert asyncio.run(both()) == want
    finally:
        engine.shutdown()
