"""Where the throughput workload's wall time goes, step by step: the BENCHMARKS.md throughput
run with each engine step timed and classified (steps with prompt tokens, and pure-decode steps by
batch size).

    PYTHONPATH=. python3 benchmarks/step_timeline.py [--num-prompts 256]
"""

from __future__ import annotations

import argparse
import collections
import time

from folovllm import LLM, SamplingParams
from folovllm.bench.workloads import throughput_workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--model", default="benchmarks/configs/qwen3-0.6b")
    ap.add_argument("--async-scheduling", default=None, choices=["on", "off"])
    args = ap.parse_args()
    kw = {} if args.async_scheduling is None else {"async_scheduling": args.async_scheduling == "on"}
    llm = LLM(args.model, load_format="dummy", **kw)
    engine = llm.llm_engine
    reqs = throughput_workload(args.num_prompts)
    log: list[tuple[int, int, bool, float]] = []
    inner = engine.engine_core.scheduler.schedule

    def schedule():  # record what each step ran: tokens, requests, pure decode?
        so = inner()
        n = len(so.num_scheduled_tokens)
        log.append((so.total_num_scheduled_tokens, n, so.total_num_scheduled_tokens == n, time.perf_counter()))
        return so

    def run(rs):
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in rs]
        params = [SamplingParams(temperature=0.6, max_tokens=r.output_len, ignore_eos=True) for r in rs]
        return llm.generate(prompts, params, use_tqdm=False)

    run(reqs[:8])
    engine.engine_core.scheduler.schedule = schedule
    t0 = time.perf_counter()
    run(reqs)
    wall = time.perf_counter() - t0
    engine.engine_core.scheduler.schedule = inner
    ends = [t for *_, t in log[1:]] + [t0 + wall]
    buckets: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0])
    for (tokens, n, decode, start), end in zip(log, ends):
        if not decode:
            key = "steps with prompt tokens"
        else:
            lo = 1 if n <= 8 else max(9, (n - 1) // 32 * 32 + 1)
            key = f"decode, {lo}-{max(lo, (n + 31) // 32 * 32) if n > 8 else 8} requests"
        b = buckets[key]
        b[0] += 1
        b[1] += end - start
        b[2] += n
    print(f"\nthroughput workload, {args.num_prompts} requests: {wall:.2f} s, {len(log)} steps")
    print(f"  {'steps':38s} {'count':>6s} {'total s':>8s} {'ms/step':>8s} {'mean reqs':>9s}")
    for key in sorted(buckets, key=lambda k: (k[0] != "s", int(k.split()[1].split("-")[0]) if k[0] == "d" else 0)):
        c, t, n = buckets[key]
        print(f"  {key:38s} {c:6d} {t:8.3f} {t / c * 1e3:8.3f} {n / c:9.1f}")


if __name__ == "__main__":
    main()
