"""AsyncLLM, the engine the server runs: the core steps in a process of its own (or a background
thread), each request has its own async stream, many streams share every step, and a stream whose
consumer leaves aborts its request. Each behaviour is checked with the core in both places."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm.engine.arg_utils import EngineArgs
from folovllm.engine.async_llm import AsyncLLM, EngineDeadError


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def offline(tiny_models):
    return LLM(**engine_kw(tiny_models))


def engine_kw(tiny_models) -> dict:
    return dict(model=tiny_models["qwen3"][0], device="cpu", max_num_seqs=8, max_num_batched_tokens=64, block_size=8)


@pytest.fixture(scope="module", params=["process", "thread"])
def engines(request, tiny_models, offline):
    async_llm = AsyncLLM.from_engine_args(EngineArgs(**engine_kw(tiny_models)), engine_core=request.param)
    yield async_llm, offline
    async_llm.shutdown()


def kv_blocks_free(llm: AsyncLLM) -> bool:
    """Every KV block free, from the counters the core sends after each step (as /metrics reads
    them): the same in both modes."""
    return llm.scheduler_stats.kv_cache_usage == 0.0 and llm.scheduler_stats.num_running_reqs == 0


async def collect(llm: AsyncLLM, prompt, params):
    texts, last = 0, None
    async for out in llm.generate({"prompt_token_ids": prompt}, params):
        texts += 1
        last = out
    return last, texts


def test_concurrent_streams_get_the_offline_tokens(engines):
    """24 requests at once (more than max_num_seqs, so they queue and share steps): each stream
    ends with exactly the tokens, finish reason and logprobs the offline engine gives (a stream
    may get fewer outputs than tokens: those that pile up while it waits are merged)."""
    async_llm, offline = engines
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    inputs = prompts(24, seed=1)

    async def main():
        return await asyncio.gather(*(collect(async_llm, p, params) for p in inputs))

    results = asyncio.run(main())
    expect = offline.generate([{"prompt_token_ids": p} for p in inputs], params, use_tqdm=False)
    for (last, num_outputs), ref in zip(results, expect):
        assert last.finished and 1 <= num_outputs <= 6
        assert last.outputs[0].token_ids == ref.outputs[0].token_ids
        assert last.outputs[0].finish_reason == "length"
        got, want = last.outputs[0].logprobs, ref.outputs[0].logprobs
        assert [sorted(d) for d in got] == [sorted(d) for d in want]
        assert all(abs(got[i][t] - want[i][t]) < 1e-5 for i in range(6) for t in want[i])
    assert async_llm.num_unfinished_requests == 0


def test_a_consumer_that_leaves_aborts_its_request(engines):
    """Leaving the stream after two outputs aborts the request: the scheduler lets go of it and
    every KV block is free again, while a request streaming alongside completes."""
    async_llm, offline = engines
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    [p1, p2] = prompts(2, seed=2)

    busy = []  # KV usage seen while the long request ran

    async def leaver():
        n = 0
        stream = async_llm.generate({"prompt_token_ids": p1}, long)
        async for _ in stream:
            n += 1
            busy.append(async_llm.scheduler_stats.kv_cache_usage)
            if n == 2:
                break
        await stream.aclose()
        return n

    async def main():
        left, (last, _) = await asyncio.gather(leaver(), collect(async_llm, p2, short))
        for _ in range(250):  # the abort is applied at the core's next step
            if kv_blocks_free(async_llm):
                break
            await asyncio.sleep(0.02)
        return left, last

    left, last = asyncio.run(main())
    assert left == 2
    [ref] = offline.generate([{"prompt_token_ids": p2}], short, use_tqdm=False)
    assert last.outputs[0].token_ids == ref.outputs[0].token_ids
    assert max(busy) > 0  # the counters are live: the long request held blocks
    assert kv_blocks_free(async_llm)


def test_bad_input_raises_before_anything_is_queued(engines):
    async_llm, _ = engines

    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in async_llm.generate({"prompt_token_ids": [5] * 600}, SamplingParams()):
                pass
        last, _ = await collect(async_llm, [5, 6], SamplingParams(temperature=0.0, max_tokens=2))
        return last

    assert asyncio.run(main()).finished
    assert async_llm.num_unfinished_requests == 0


def test_a_dead_engine_fails_every_stream(tiny_models, monkeypatch):
    """If the core's loop raises, each waiting stream gets EngineDeadError instead of hanging,
    and so does any later request."""
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_models["qwen2"][0], device="cpu"), engine_core="thread")

    def broken_step():
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(llm.engine_core, "step", broken_step)
    llm.check_health()  # nothing has failed yet

    async def main():
        with pytest.raises(EngineDeadError, match="the device fell over"):
            await asyncio.wait_for(collect(llm, [5, 6, 7], SamplingParams(max_tokens=3)), timeout=10)
        with pytest.raises(EngineDeadError):
            await collect(llm, [5], SamplingParams(max_tokens=3))
        with pytest.raises(EngineDeadError, match="the device fell over"):
            llm.check_health()

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_abort_and_shutdown_end_the_streams_being_read(tiny_models, mode):
    """abort() gives the stream it ends a last output (finish_reason 'abort') instead of leaving
    its reader waiting; shutdown() does the same for every stream."""
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_models["llama"][0], device="cpu"), engine_core=mode)
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def read(request_id, prompt):
        outs = []
        async for out in llm.generate({"prompt_token_ids": prompt}, long, request_id=request_id):
            outs.append(out)
        return outs

    async def main():
        x = asyncio.create_task(read("x", [5, 6, 7]))
        y = asyncio.create_task(read("y", [8, 9]))
        while llm.output_processor.states.get("x") is None or not llm.output_processor.states["x"].output_token_ids:
            await asyncio.sleep(0.01)
        llm.abort("x")
        xs = await asyncio.wait_for(x, timeout=5)
        llm.shutdown()
        ys = await asyncio.wait_for(y, timeout=5)
        return xs, ys

    xs, ys = asyncio.run(main())
    for outs in (xs, ys):
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert len(outs[-1].outputs[0].token_ids) < 400


def test_a_killed_engine_process_fails_every_stream(tiny_models):
    """The core's process killed mid-stream (out of memory, a crash): the stream being read and
    any later request get EngineDeadError within seconds, naming the exit."""
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_models["qwen2"][0], device="cpu"))
    child = llm.engine_core.process
    long = SamplingParams(temperature=0.0, max_tokens=5000, ignore_eos=True)

    async def main():
        got = 0
        with pytest.raises(EngineDeadError, match="died"):
            async with asyncio.timeout(20):
                async for _ in llm.generate({"prompt_token_ids": [5, 6, 7]}, long):
                    got += 1
                    if got == 3:
                        os.kill(child.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            await collect(llm, [5], SamplingParams(max_tokens=3))
        return got

    try:
        assert asyncio.run(main()) >= 3
    finally:
        llm.shutdown()
    assert not child.is_alive()


def test_shutdown_and_a_dead_parent_leave_no_engine_process(tiny_models, tmp_path):
    """shutdown() ends the core's process; and a parent killed with SIGKILL (no clean-up at all)
    leaves no orphan: the child sees its parent gone and exits within seconds."""
    llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_models["llama"][0], device="cpu"))
    child = llm.engine_core.process
    assert child.is_alive()
    llm.shutdown()
    assert not child.is_alive()

    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from folovllm.engine.arg_utils import EngineArgs
        from folovllm.engine.async_llm import AsyncLLM
        if __name__ == "__main__":  # the engine-core process is spawned: it imports this module
            llm = AsyncLLM.from_engine_args(EngineArgs(model={tiny_models["llama"][0]!r}, device="cpu"))
            print(llm.engine_core.process.pid, flush=True)
            time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert pid_alive(child_pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while pid_alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(child_pid), "the engine-core process outlived its killed parent"
    finally:
        parent.kill()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_stream_that_falls_behind_gets_merged_outputs(engines):
    """A reader that stops reading after the first output until the core has finished the
    request: the outputs that piled up reach it as one (they are cumulative), so it sees exactly
    two outputs, and ends with the offline tokens."""
    async_llm, offline = engines
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    [prompt] = prompts(1, seed=5)

    async def main():
        seen = []
        async for out in async_llm.generate({"prompt_token_ids": prompt}, params):
            seen.append(list(out.outputs[0].token_ids))
            if len(seen) == 1:  # fall behind: wait until the core is done with the request
                for _ in range(3000):
                    await asyncio.sleep(0.01)
                    if async_llm.scheduler_stats.num_running_reqs == 0 and \
                            async_llm.scheduler_stats.num_waiting_reqs == 0:
                        break
        return seen

    seen = asyncio.run(main())
    [ref] = offline.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert len(seen) == 2 and seen[-1] == ref.outputs[0].token_ids
    assert seen[1][:len(seen[0])] == seen[0]


def test_a_script_that_never_shuts_down_exits_and_leaves_no_engine_process(tiny_models, tmp_path):
    """Interpreter exit without shutdown(): the finalizer stops the core's process, so the script
    neither hangs on its child nor leaves it behind."""
    script = tmp_path / "forgetful.py"
    script.write_text(textwrap.dedent(f"""
        from folovllm.engine.arg_utils import EngineArgs
        from folovllm.engine.async_llm import AsyncLLM
        if __name__ == "__main__":
            llm = AsyncLLM.from_engine_args(EngineArgs(model={tiny_models["llama"][0]!r}, device="cpu"))
            print(llm.engine_core.process.pid, flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(proc.stdout.readline())
        assert proc.wait(30) == 0
        assert not pid_alive(child_pid)
    finally:
        proc.kill()


def test_the_engine_core_process_freezes_what_start_up_left(tiny_models):
    """The engine-core process collects once and freezes its start-up heap before it serves
    (so later full collections skip those objects); the helper collects cycles first."""
    llm = AsyncLLM.from_engine_args(EngineArgs(**engine_kw(tiny_models)))
    try:
        assert llm.engine_core.startup_times["gc_freeze"] >= 0
    finally:
        llm.shutdown()
    code = textwrap.dedent("""
        import gc, weakref
        from folovllm.engine.core import freeze_startup_heap
        class Node: pass
        a = Node(); a.me = a; alive = weakref.ref(a); del a   # garbage only a collection frees
        assert gc.get_freeze_count() == 0
        freeze_startup_heap()
        assert alive() is None, "a start-up cycle was frozen instead of collected"
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
