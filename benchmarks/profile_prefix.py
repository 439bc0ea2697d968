"""Where the prefix workload's first-token time goes (BENCHMARKS.md: 64 requests, 4 shared
2048-token prefixes, 128-token suffixes, prefix caching on, the prefixes seen once before timing).

    PYTHONPATH=. python3 benchmarks/profile_prefix.py [--attention]
    PYTHONPATH=. python3 benchmarks/profile_prefix.py --synchronous [--kernels] [--cprofile]

Prints, for the timed `generate(max_tokens=1)` call: its wall time split into host phases
(_queue: validating and queuing the prompts, which LLM.generate does a slice at a time between
steps; schedule, execute_model, update; async scheduling as the engine runs it); or,
with --synchronous, each step run synchronously with its wall time and scheduled tokens; with --kernels the GPU time
per kernel of those steps (torch.profiler); with --attention the attention of one such step alone
(64 x 128 queries over 2,176-token contexts) for a few tile configurations, in TFLOP/s.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from folovllm import LLM, SamplingParams
from folovllm.bench.workloads import prefix_workload


def timed_phases(llm, prefixes, prompts, params) -> None:
    engine = llm.llm_engine
    core = engine.engine_core
    phases: dict[str, float] = {}

    def wrap(obj, name):
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        setattr(obj, name, timed)
        return fn

    originals = [(engine, "_queue", wrap(engine, "_queue")),
                 (core.scheduler, "schedule", wrap(core.scheduler, "schedule")),
                 (core.executor, "execute_model", wrap(core.executor, "execute_model")),
                 (core.scheduler, "update_from_output", wrap(core.scheduler, "update_from_output"))]
    for it in range(4):
        llm.reset_prefix_cache()
        llm.generate([{"prompt_token_ids": p} for p in prefixes], params, use_tqdm=False)
        torch.cuda.synchronize()
        phases.clear()
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - t0
        if it:
            print(f"first tokens of all {len(prompts)}: {wall * 1e3:7.1f} ms | "
                  + " | ".join(f"{k} {v * 1e3:.1f}" for k, v in phases.items()))
    for obj, name, fn in originals:
        setattr(obj, name, fn)


def synchronous_steps(model: str, prefixes, prompts, params, kernels: bool, cprofile: bool) -> None:
    llm = LLM(model, load_format="dummy", async_scheduling=False)
    engine = llm.llm_engine
    scheduler = engine.engine_core.scheduler
    for it in range(3):
        llm.reset_prefix_cache()
        llm.generate([{"prompt_token_ids": p} for p in prefixes], params, use_tqdm=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = engine.add_requests([{"prompt_token_ids": p} for p in prompts], params)
        t_add = time.perf_counter() - t0
        rows = []
        while engine.has_unfinished_requests():
            torch.cuda.synchronize()
            ts = time.perf_counter()
            inner = scheduler.schedule
            got = {}

            def schedule():
                so = inner()
                got["tokens"] = so.total_num_scheduled_tokens
                got["reqs"] = len(so.num_scheduled_tokens)
                return so
            scheduler.schedule = schedule
            engine.step()
            scheduler.schedule = inner
            torch.cuda.synchronize()
            rows.append((got.get("tokens", 0), got.get("reqs", 0), (time.perf_counter() - ts) * 1e3))
        total = (time.perf_counter() - t0) * 1e3
        if it:
            print(f"synchronous: {total:.1f} ms, add_requests {t_add * 1e3:.1f} ms, steps (tokens, requests, ms): "
                  + ", ".join(f"({a}, {b}, {c:.1f})" for a, b, c in rows))
        del ids
    if cprofile:
        import cProfile
        import io
        import pstats
        llm.reset_prefix_cache()
        llm.generate([{"prompt_token_ids": p} for p in prefixes], params, use_tqdm=False)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        torch.cuda.synchronize()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue())
    if kernels:
        llm.reset_prefix_cache()
        llm.generate([{"prompt_token_ids": p} for p in prefixes], params, use_tqdm=False)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as tp:
            llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            torch.cuda.synchronize()
        print(tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))


def attention_alone(num_reqs_list=(16, 64)) -> None:
    """One step's attention at the prefix workload's shape (num_reqs x 128 queries over 2,176-token
    contexts; 16 is one slice of LLM.generate, 64 the batch queued whole), per layer, for a few
    tile configurations, against SDPA on contiguous tensors."""
    from dataclasses import replace

    from triton.testing import do_bench

    from folovllm.attention.ops.triton_unified_attention import PREFILL_CONFIG, unified_attention
    H, KVH, D, BS = 16, 8, 128, 16
    for nr in num_reqs_list:
        reqs = [(128, 2176)] * nr
        nblocks = [-(-s // BS) for _, s in reqs]
        g = torch.Generator().manual_seed(0)
        pool = torch.randperm(sum(nblocks), generator=g)
        bt = pool.view(len(reqs), -1).to(torch.int32).cuda()
        qsl = torch.tensor([0] + [128 * (i + 1) for i in range(len(reqs))], dtype=torch.int32, device="cuda")
        seq_lens = torch.tensor([s for _, s in reqs], dtype=torch.int32, device="cuda")
        kv = torch.randn(2, sum(nblocks), BS, KVH, D, dtype=torch.bfloat16, device="cuda")
        q = torch.randn(128 * len(reqs), H, D, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        flops = 4 * H * D * sum(ql * (2 * s - ql + 1) / 2 for ql, s in reqs)
        configs = [PREFILL_CONFIG] + [replace(PREFILL_CONFIG, block_m=m, block_n=n, num_warps=w, num_stages=st)
                                      for m, n, w, st in ((64, 64, 4, 3), (64, 128, 4, 2), (64, 128, 8, 2),
                                                          (64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3),
                                                          (128, 128, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3))]
        qs = q.view(len(reqs), 128, H, D).transpose(1, 2)
        ks = torch.randn(len(reqs), KVH, 2176, D, dtype=torch.bfloat16, device="cuda")
        mask = torch.ones(128, 2176, dtype=torch.bool, device="cuda").tril(2176 - 128)
        t = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, ks, attn_mask=mask,
                                                                               enable_gqa=True),
                     warmup=10, rep=100, return_mode="median") * 1e-3
        print(f"attention of one step ({nr} x 128 queries, 2176 keys), per layer; x28 for the model")
        print(f"  torch SDPA (contiguous, mask): {t * 1e6:8.1f} us  {flops / t / 1e12:6.1f} TFLOP/s")
        ref = None
        for cfg in configs:
            fn = lambda: unified_attention(q, kv, out, qsl, seq_lens, bt, D ** -0.5, 128,  # noqa: E731
                                           path="general", config=cfg)
            try:
                fn()
                if ref is None:
                    ref = out.clone()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                t = do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3
                print(f"  {cfg}: {t * 1e6:8.1f} us  {flops / t / 1e12:6.1f} TFLOP/s  (vs first: {err:.1e})")
            except Exception as e:  # a configuration that does not fit shared memory
                print(f"  {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/configs/qwen3-0.6b")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--cprofile", action="store_true", help="with --synchronous: the host's time by function")
    ap.add_argument("--attention", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    ap.add_argument("--synchronous", action="store_true",
                    help="the steps run synchronously, one by one (one engine per process: run it on its own)")
    args = ap.parse_args()
    prefixes, prompts = prefix_workload(4, 16, 2048, 128, 0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    if args.attention:
        attention_alone()
    if args.synchronous:
        synchronous_steps(args.model, prefixes, prompts, params, args.kernels, args.cprofile)
    else:
        # the model's own max_model_len unless given, as bench prefix runs it
        timed_phases(LLM(args.model, load_format="dummy", max_model_len=args.max_model_len), prefixes, prompts,
                     params)


if __name__ == "__main__":
    main()
