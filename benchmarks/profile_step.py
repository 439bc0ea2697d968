"""Where one engine step's time goes: host (cProfile of LLMEngine.step) and device, for decode at
batch 1 and batch 256 on the dummy Qwen3-0.6B.

    PYTHONPATH=. python3 benchmarks/profile_step.py [--batch 1 256] [--steps 50]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from folovllm import LLM, SamplingParams
from folovllm.worker.model_runner import StepOutput


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--phases", action="store_true", help="only the per-phase split of a step")
    ap.add_argument("--kernels", action="store_true", help="only the per-kernel GPU time of a decode step")
    args = ap.parse_args()
    # Steps are driven one at a time here, so the engine runs synchronously.
    llm = LLM("benchmarks/configs/qwen3-0.6b", load_format="dummy", enforce_eager=args.enforce_eager,
              max_model_len=4096, async_scheduling=False)
    engine = llm.llm_engine
    g = torch.Generator().manual_seed(0)
    for batch in args.batch:
        for i in range(batch):
            ids = torch.randint(0, 10000, (args.prompt_len,), generator=g).tolist()
            engine.add_request(f"b{batch}-{i}", {"prompt_token_ids": ids},
                               SamplingParams(max_tokens=args.steps + 40, ignore_eos=True, temperature=args.temperature),
                               stream=False)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.engine_core.scheduler.requests.values()):
            engine.step()
        for _ in range(5):
            engine.step()
        if args.phases or args.kernels:
            print(f"\n===== batch {batch}: {'phases' if args.phases else 'kernels'} of a decode step")
            (phases if args.phases else kernels)(engine, args.steps)
            engine.abort_request(list(engine.engine_core.scheduler.requests))
            engine.step()
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        per_step = (time.perf_counter() - t0) / args.steps * 1e3
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            engine.step()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        print(f"\n===== batch {batch}: {per_step:.3f} ms per decode step (graphs: "
              f"{bool(engine.engine_core.executor.driver_worker.model_runner.graphs)})")
        print("\n".join(s.getvalue().splitlines()[:45]))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as tp:
            for _ in range(5):
                engine.step()
        print(tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        engine.abort_request(list(engine.engine_core.scheduler.requests))
        engine.step()




def phases(engine, steps: int) -> None:
    """One step split into its phases: host time of each, and the GPU time of the forward and
    sampling, measured with CUDA events."""
    import collections
    runner = engine.engine_core.executor.driver_worker.model_runner
    acc = collections.defaultdict(float)
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        so = engine.engine_core.scheduler.schedule()
        t1 = time.perf_counter()
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        hidden, step = runner.forward(so)
        mid.record()
        t2 = time.perf_counter()
        logits = runner.model.compute_logits(hidden)
        out = StepOutput(list(so.num_scheduled_tokens), runner.input_batch.num_removals)
        runner._sample(logits, step, out)
        runner._unread.append(out)
        result = out.result()  # ends with the host sync
        runner.read_all_outputs()
        end.record()
        t3 = time.perf_counter()
        core = engine.engine_core.scheduler.update_from_output(so, result)
        t4 = time.perf_counter()
        engine.output_processor.process(core)
        t5 = time.perf_counter()
        torch.cuda.synchronize()
        acc["schedule"] += t1 - t0
        acc["prepare+copy+replay (host)"] += t2 - t1
        acc["logits+sample+sync (host)"] += t3 - t2
        acc["update_from_output"] += t4 - t3
        acc["output processing"] += t5 - t4
        acc["step wall"] += t5 - t0
        acc["GPU: forward"] += start.elapsed_time(mid) / 1e3
        acc["GPU: logits+sample"] += mid.elapsed_time(end) / 1e3
    for k, v in acc.items():
        print(f"  {k:32s} {v / steps * 1e3:7.3f} ms")


def kernels(engine, steps: int) -> None:
    """GPU time per decode step by kernel (kernels inside graph replays included), and the sum
    against the step's GPU span: the difference is the gaps between kernels."""
    import collections
    from torch.autograd import DeviceType
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tp:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    acc: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    first, last = float("inf"), 0.0
    for e in tp.events():
        if e.device_type != DeviceType.CUDA or "Memcpy" in e.name or "Memset" in e.name:
            continue
        a = acc[e.name[:70]]
        a[0] += 1
        a[1] += e.device_time
        first = min(first, e.time_range.start)
        last = max(last, e.time_range.end)
    busy = sum(v[1] for v in acc.values()) / steps
    print(f"  {'kernel':70s} {'calls':>6s} {'us/step':>8s} {'us/call':>8s}")
    for name, (n, t) in sorted(acc.items(), key=lambda kv: -kv[1][1])[:24]:
        print(f"  {name:70s} {n / steps:6.1f} {t / steps:8.1f} {t / n:8.2f}")
    print(f"  kernels {sum(v[0] for v in acc.values()) / steps:.0f}/step, busy {busy:.0f} us/step, "
          f"span {(last - first) / steps:.0f} us/step")


if __name__ == "__main__":
    main()
