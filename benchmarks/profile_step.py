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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()
    llm = LLM("benchmarks/configs/qwen3-0.6b", load_format="dummy", enforce_eager=args.enforce_eager,
              max_model_len=4096)
    engine = llm.llm_engine
    g = torch.Generator().manual_seed(0)
    for batch in args.batch:
        for i in range(batch):
            ids = torch.randint(0, 10000, (args.prompt_len,), generator=g).tolist()
            engine.add_request(f"b{batch}-{i}", {"prompt_token_ids": ids},
                               SamplingParams(max_tokens=args.steps + 40, ignore_eos=True, temperature=0.0),
                               stream=False)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
            engine.step()
        for _ in range(5):
            engine.step()
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
              f"{bool(engine.executor.worker.model_runner.graphs)})")
        print("\n".join(s.getvalue().splitlines()[:45]))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as tp:
            for _ in range(5):
                engine.step()
        print(tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        engine.abort_request(list(engine.scheduler.requests))
        engine.step()


if __name__ == "__main__":
    main()
