"""What the longest gaps of the chunked workload (BENCHMARKS.md) are made of: the `bench chunked`
run with every engine step and every Python garbage collection timed, then for the largest gaps
between two decoder tokens the steps and collections inside them, with what each step scheduled
(and EAGER where that step's forward pass replays no CUDA graph).

    PYTHONPATH=. python3 benchmarks/gap_timeline.py [--chunked-budget 1024] [--mode chunked]
"""

from __future__ import annotations

import argparse
import gc
import time

from folovllm.bench import chunked
from folovllm.engine.arg_utils import EngineArgs
from folovllm.core.sched.scheduler import Scheduler
from folovllm.engine.llm_engine import LLMEngine
from folovllm.executor.uniproc import UniprocExecutor
from folovllm.worker.model_runner import ModelRunner, StepOutput


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/configs/qwen3-0.6b")
    ap.add_argument("--chunked-budget", type=int, default=1024)
    ap.add_argument("--mode", default="chunked", choices=chunked.MODES)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--freeze", action="store_true", help="gc.freeze() before the first step")
    ap.add_argument("--num-decoders", type=int, default=64)
    ap.add_argument("--long-len", type=int, default=8192)
    args = ap.parse_args()

    steps: list[tuple[float, float, int, str]] = []     # (start, end, outputs, what it scheduled)
    collections: list[tuple[float, float, int]] = []  # (start, end, generation)
    inner_step = LLMEngine.step
    inner_schedule = Scheduler.schedule
    inner_key = ModelRunner._graph_key
    planned: list[str] = []
    phases: dict[str, float] = {}

    def timed(cls, name):
        fn = getattr(cls, name)

        def wrapper(*a, **k):
            t0 = time.monotonic()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.monotonic() - t0
        setattr(cls, name, wrapper)
        return cls, name, fn

    def schedule(self):
        so = inner_schedule(self)
        prompt = sum(n for n in so.num_scheduled_tokens.values() if n > 1)
        planned.append(f"{len(so.num_scheduled_tokens)} reqs/{so.total_num_scheduled_tokens} tok"
                       + (f" ({prompt} prompt)" if prompt else ""))
        return so

    def graph_key(self, step, num_tokens):
        key = inner_key(self, step, num_tokens)
        if key is None and planned:
            planned[-1] += " EAGER"
        return key

    def step(self):
        if args.freeze and not steps:
            gc.collect()
            gc.freeze()
        t0 = time.monotonic()
        planned.clear()
        phases.clear()
        outs = inner_step(self)
        split = " ".join(f"{k.split('_')[0]} {v * 1e3:.1f}" for k, v in phases.items())
        steps.append((t0, time.monotonic(), len(outs), "; ".join(planned) + " | " + split))
        return outs

    started: dict[str, float] = {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = time.monotonic()
        else:
            collections.append((started.get("t", time.monotonic()), time.monotonic(), info["generation"]))

    LLMEngine.step = step
    Scheduler.schedule = schedule
    ModelRunner._graph_key = graph_key
    originals = [timed(Scheduler, "schedule"), timed(UniprocExecutor, "execute_model"),
                 timed(StepOutput, "result"), timed(Scheduler, "update_from_output")]
    gc.callbacks.append(on_gc)
    ns = argparse.Namespace(num_decoders=args.num_decoders, decoder_input_len=512, decoder_output_len=1024, num_long=4,
                            long_input_len=args.long_len, long_output_len=16, arrival_interval_ms=250.0, window_s=1.5,
                            chunked_budget=args.chunked_budget, modes=[args.mode], output_json=None)
    ea = EngineArgs(model=args.model, load_format="dummy", max_model_len=10240)
    r = chunked.run(ns, ea)
    gc.callbacks.remove(on_gc)
    for cls, name, fn in reversed(originals):
        setattr(cls, name, fn)
    LLMEngine.step = inner_step
    Scheduler.schedule = inner_schedule
    ModelRunner._graph_key = inner_key
    m = r["results"][args.mode]
    print(f"{args.mode} budget {m['max_num_batched_tokens']}: p50 {m['itl_p50_ms']:.1f} p99 {m['itl_p99_ms']:.1f} "
          f"max {m['itl_max_ms']:.1f} ms")
    # Gaps between consecutive steps that returned outputs, largest first.
    out_steps = [s for s in steps if s[2]]
    gaps = sorted(((b[1] - a[1], a, b) for a, b in zip(out_steps, out_steps[1:])), reverse=True)[:args.top]
    print(f"{len(collections)} collections: gen2 {sum(c[2] == 2 for c in collections)}, longest "
          f"{max((c[1] - c[0] for c in collections), default=0) * 1e3:.1f} ms")
    for c in collections:
        if c[2] == 2:
            print(f"  gen2 collection at {c[0] - steps[0][0]:7.3f} s: {(c[1] - c[0]) * 1e3:.1f} ms")
    for gap, a, b in gaps:
        inside = [s for s in steps if s[0] >= a[1] - 1e-6 and s[1] <= b[1] + 1e-6]
        gcs = [c for c in collections if c[0] >= a[1] and c[1] <= b[1]]
        print(f"at {(a[1] - steps[0][0]):7.3f} s, gap {gap * 1e3:6.1f} ms: steps (start after the gap opened, length) "
              + ", ".join(f"+{(s[0] - a[1]) * 1e3:.1f} {(s[1] - s[0]) * 1e3:.1f} ms [{s[3]}]" for s in inside)
              + (" | gc " + ", ".join(f"gen{c[2]} {(c[1] - c[0]) * 1e3:.1f} ms" for c in gcs) if gcs else ""))


if __name__ == "__main__":
    main()
