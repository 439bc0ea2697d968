"""Where a mixed step's time goes: 64 requests decoding while one 8192-token prompt is prefilled
in chunks (the chunked workload of BENCHMARKS.md, one long prompt), stepped synchronously so each
step can be timed alone.

    PYTHONPATH=. python3 benchmarks/profile_chunked.py [--budget 2048] [--kernels]

(one budget per process on a GPU: each engine takes the free memory for its KV cache)

For each budget: every step's wall time (host sync at its end) next to what it ran (prompt tokens,
decodes, the chunk's context length), and with --kernels the GPU time per kernel of the mixed
steps (torch.profiler), largest first.
"""

from __future__ import annotations

import argparse
import time

import torch

from folovllm import LLM, SamplingParams


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(model: str, budget: int, kernels: bool, num_decoders: int, long_len: int) -> None:
    llm = LLM(model, load_format="dummy", max_model_len=10240,
              max_num_batched_tokens=budget, async_scheduling=False, enable_prefix_caching=False)
    engine = llm.llm_engine
    core = engine.engine_core
    scheduler = core.scheduler
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 10000, (n,), generator=g).tolist()  # noqa: E731
    params = SamplingParams(max_tokens=1024, ignore_eos=True, temperature=0.0)
    for i in range(num_decoders):
        engine.add_request(f"d{i}", {"prompt_token_ids": ids(512)}, params, stream=False)
    engine.step()  # adds are applied at the start of a step
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.requests.values()):
        engine.step()
    for _ in range(10):
        engine.step()

    log = []
    inner = scheduler.schedule

    def schedule():
        so = inner()
        long = so.num_scheduled_tokens.get("long", 0)
        req = scheduler.requests.get("long")
        ctx = req.num_computed_tokens if req is not None and long else 0  # already advanced by schedule()
        log.append([long, len(so.num_scheduled_tokens) - (1 if long else 0), ctx, 0.0])
        return so

    def timed_steps(n: int | None = None) -> None:
        k = 0
        while n is None or k < n:
            sync()
            t0 = time.perf_counter()
            engine.step()
            sync()
            log[-1][3] = (time.perf_counter() - t0) * 1e3
            k += 1
            if n is None and "long" in scheduler.requests and \
                    scheduler.requests["long"].num_output_tokens > 0:
                break

    scheduler.schedule = schedule
    timed_steps(5)  # pure decode steps, for scale
    engine.add_request("long", {"prompt_token_ids": ids(long_len)}, params, stream=False)
    timed_steps()
    timed_steps(3)
    print(f"\n===== budget {budget}: {num_decoders} decoders + one {long_len}-token prompt")
    print(f"  {'long tokens':>13s} {'decodes':>8s} {'context':>8s} {'step ms':>8s}")
    for long, dec, ctx, ms in log:
        print(f"  {long:13d} {dec:8d} {ctx:8d} {ms:8.2f}")

    if kernels:
        engine.abort_request(["long"])
        engine.step()
        engine.add_request("long", {"prompt_token_ids": ids(long_len)}, params, stream=False)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as tp:
            engine.step()  # the add is applied at the start of a step
            while scheduler.requests["long"].num_output_tokens == 0:
                engine.step()
        print(f"\n  kernels over the mixed steps of one {long_len}-token prompt (budget {budget}):")
        print(tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))
    scheduler.schedule = inner
    engine.abort_request(list(scheduler.requests))
    engine.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, nargs="+", default=[2048, 10240])
    ap.add_argument("--num-decoders", type=int, default=64)
    ap.add_argument("--long-len", type=int, default=8192)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--model", default="benchmarks/configs/qwen3-0.6b")
    args = ap.parse_args()
    for budget in args.budget:
        run(args.model, budget, args.kernels, args.num_decoders, args.long_len)


if __name__ == "__main__":
    main()
