"""The latency workload (BENCHMARKS.md): a batch of random prompts, greedy, a fixed number of
output tokens; TTFT and TPOT per batch size, each the median over runs of the per-run median over
the batch's requests."""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np

from folovllm.bench.floor import device_name
from folovllm.bench.throughput import resolve_target
from folovllm.bench.workloads import TOKEN_ID_LIMIT, random_prompts
from folovllm.engine.arg_utils import EngineArgs


def _folovllm(ns, engine_args: EngineArgs, limit: int) -> tuple[dict, float]:
    from folovllm.entrypoints.llm import LLM
    from folovllm.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**dataclasses.asdict(engine_args))
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    rng = np.random.default_rng(engine_args.seed)
    results = {}
    for bs in ns.batch_sizes:
        runs = []
        for i in range(ns.num_iters_warmup + ns.num_iters):
            # Fresh prompts each run, so that a prefix cache (if on) cannot serve one run from another.
            prompts = [{"prompt_token_ids": p} for p in random_prompts(bs, ns.input_len, rng, limit)]
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            e2e = time.perf_counter() - t0
            if i < ns.num_iters_warmup:
                continue
            ttft, tpot = [], []
            for o in outs:
                m, n = o.metrics, len(o.outputs[0].token_ids)
                ttft.append(m.first_token_time - m.arrival_time)
                if n > 1:
                    tpot.append((m.finished_time - m.first_token_time) / (n - 1))
            runs.append(dict(ttft_s=statistics.median(ttft), tpot_s=statistics.median(tpot) if tpot else None,
                             e2e_s=e2e, output_tokens=sum(len(o.outputs[0].token_ids) for o in outs)))
        results[bs] = runs
    return results, startup


def _hf(ns, model: str, device, dtype, seed: int, limit: int) -> tuple[dict, float]:
    """Eager `generate`: TTFT is when its first new token arrives, TPOT the rest of the same call
    per token."""
    from folovllm.bench import hf_peer

    t0 = time.perf_counter()
    m = hf_peer.load_model(model, device, dtype, "sdpa", seed)
    startup = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    results = {}
    for bs in ns.batch_sizes:
        runs = []
        for i in range(ns.num_iters_warmup + ns.num_iters):
            prompts = random_prompts(bs, ns.input_len, rng, limit)
            first, full = hf_peer.generate_timings(m, prompts, ns.output_len)
            if i >= ns.num_iters_warmup:
                runs.append(dict(ttft_s=first, tpot_s=(full - first) / max(ns.output_len - 1, 1), e2e_s=full,
                                 output_tokens=bs * ns.output_len))
        results[bs] = runs
    return results, startup


def run(ns, engine_args: EngineArgs) -> dict:
    model, hf_config, device, dtype = resolve_target(engine_args)
    limit = min(TOKEN_ID_LIMIT, hf_config.vocab_size)
    if ns.backend == "folovllm":
        per_bs, startup = _folovllm(ns, engine_args, limit)
    else:
        per_bs, startup = _hf(ns, model, device, dtype, engine_args.seed, limit)
    rows = []
    for bs, runs in per_bs.items():
        tpots = [r["tpot_s"] for r in runs if r["tpot_s"] is not None]
        rows.append(dict(batch_size=bs, ttft_ms=1e3 * statistics.median(r["ttft_s"] for r in runs),
                         tpot_ms=1e3 * statistics.median(tpots) if tpots else None,
                         e2e_s=statistics.median(r["e2e_s"] for r in runs),
                         output_tokens=runs[0]["output_tokens"], runs=runs))
    return dict(kind="latency", backend=ns.backend, model=model, device=device_name(device), device_type=device.type,
                dtype=str(dtype).removeprefix("torch."), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                input_len=ns.input_len, output_len=ns.output_len, num_iters=ns.num_iters,
                method="eager generate: TTFT = its first new token (a streamer clocks it), TPOT = (full - TTFT) / (N - 1), one call"
                if ns.backend == "hf" else "engine metrics: TTFT = first_token - arrival, "
                "TPOT = (finished - first_token) / (N - 1)",
                startup_s=startup, results=rows, notes=["CPU figures"] if device.type == "cpu" else [])


def report(r: dict) -> str:
    lines = [f"latency [{r['backend']}] on {r['device']}, {r['dtype']}: prompt {r['input_len']}, "
             f"{r['output_len']} output tokens, median of {r['num_iters']} runs ({r['method']})"]
    for row in r["results"]:
        tpot = f"{row['tpot_ms']:.2f}" if row["tpot_ms"] is not None else "-"
        lines.append(f"  batch {row['batch_size']:>4}: TTFT {row['ttft_ms']:8.2f} ms | TPOT {tpot:>7} ms | "
                     f"e2e {row['e2e_s']:.3f} s")
    return "\n".join(lines)
