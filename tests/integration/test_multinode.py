"""Multi-node tensor parallelism (FOLOVLLM_DISTRIBUTED=env), on one host: rank 1 is a
`folovllm worker` process and rank 0 an engine process, started by hand with the env://
variables the way two nodes would start them; over gloo on CPU they give the same greedy tokens
as one process, both exit 0, and a worker whose rank 0 is killed exits on its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from folovllm import LLM, SamplingParams
from folovllm.executor.multiproc import get_open_port

PROMPTS = [[5, 6, 7], list(range(9, 30)), [30], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
ENGINE = dict(max_model_len=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=16)
FLAGS = ["--max-model-len", "64", "--block-size", "8", "--max-num-seqs", "4", "--max-num-batched-tokens", "16"]
TIMEOUT_S = 60

RANK0 = textwrap.dedent("""
    import json, sys, time
    from folovllm import LLM, SamplingParams

    if __name__ == "__main__":
        path, prompts, engine, hang = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
        llm = LLM(path, device="cpu", tensor_parallel_size=2, **engine)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
        if hang == "1":
            time.sleep(600)  # killed by the test
        llm.llm_engine.shutdown()
""")


def rank_env(rank: int, port: int) -> dict:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
               LOCAL_RANK="0", FOLOVLLM_DISTRIBUTED="env", OMP_NUM_THREADS="1")
    return env


def start_ranks(tmp_path, path: str, hang: bool):
    port = get_open_port()
    script = tmp_path / "rank0.py"
    script.write_text(RANK0)
    worker = subprocess.Popen([sys.executable, "-m", "folovllm", "worker", "--model", path,
                               "--tensor-parallel-size", "2", "--device", "cpu", *FLAGS],
                              env=rank_env(1, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    engine = subprocess.Popen([sys.executable, str(script), path, json.dumps(PROMPTS), json.dumps(ENGINE),
                               "1" if hang else "0"],
                              env=rank_env(0, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return worker, engine


def stop(*procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@pytest.fixture(scope="module")
def want(tiny_models):
    path = tiny_models["qwen3"][0]
    one = LLM(path, device="cpu", tensor_parallel_size=1, **ENGINE)
    outs = one.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    one.llm_engine.shutdown()
    return [o.outputs[0].token_ids for o in outs]


def test_two_ranks_match_one(tiny_models, want, tmp_path):
    path = tiny_models["qwen3"][0]
    worker, engine = start_ranks(tmp_path, path, hang=False)
    try:
        out, _ = engine.communicate(timeout=TIMEOUT_S)
        wout, _ = worker.communicate(timeout=10)
    finally:
        stop(worker, engine)
    assert engine.returncode == 0, out
    assert worker.returncode == 0, wout
    line = next(l for l in out.splitlines() if l.startswith("TOKENS "))
    assert json.loads(line[len("TOKENS "):]) == want


def test_worker_exits_when_rank0_dies(tiny_models, want, tmp_path):
    path = tiny_models["qwen3"][0]
    worker, engine = start_ranks(tmp_path, path, hang=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        line = ""
        while not line.startswith("TOKENS ") and time.monotonic() < deadline and engine.poll() is None:
            line = engine.stdout.readline()
        assert line.startswith("TOKENS "), "rank 0 did not generate"
        assert json.loads(line[len("TOKENS "):]) == want
        engine.send_signal(signal.SIGKILL)
        engine.wait(10)
        wout, _ = worker.communicate(timeout=15)
    finally:
        stop(worker, engine)
    assert worker.returncode == 1, wout
    assert "rank 0 went away" in wout


def test_mismatched_flags_refused(tiny_models, tmp_path):
    """A worker started with other engine settings than rank 0 fails on both ranks, naming them."""
    path = tiny_models["qwen3"][0]
    port = get_open_port()
    script = tmp_path / "rank0.py"
    script.write_text(RANK0)
    worker = subprocess.Popen([sys.executable, "-m", "folovllm", "worker", "--model", path,
                               "--tensor-parallel-size", "2", "--device", "cpu", *FLAGS[:-2],
                               "--max-num-batched-tokens", "32"],
                              env=rank_env(1, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    engine = subprocess.Popen([sys.executable, str(script), path, json.dumps(PROMPTS), json.dumps(ENGINE), "0"],
                              env=rank_env(0, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = engine.communicate(timeout=TIMEOUT_S)
        wout, _ = worker.communicate(timeout=10)
    finally:
        stop(worker, engine)
    assert engine.returncode != 0 and worker.returncode != 0
    assert "max_num_batched_tokens" in out and "max_num_batched_tokens" in wout
