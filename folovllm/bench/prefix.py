"""The prefix workload (BENCHMARKS.md): 64 requests, 4 distinct 2048-token prefixes x 16 requests
each with a 128-token suffix of its own, greedy, the 4 prefixes seen once before timing. Reported,
with prefix caching on and off: the time until all 64 have their first token (generate with
max_tokens=1) and the wall time of all 64 with 64 output tokens each, medians of 3.

Each timed call starts from the same cache: the cache is emptied (reset_prefix_cache) and the 4
prefixes run once untimed, so a repeat cannot hit the suffixes of the one before."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time

import torch

from folovllm.bench.floor import device_name
from folovllm.bench.throughput import resolve_target
from folovllm.bench.workloads import TOKEN_ID_LIMIT, prefix_workload
from folovllm.engine.arg_utils import EngineArgs

MODES = {"on": True, "off": False}


def _run_mode(engine_args: EngineArgs, caching: bool, prefixes: list[list[int]], prompts: list[list[int]],
              output_len: int, num_iters: int) -> dict:
    from folovllm.entrypoints.llm import LLM
    from folovllm.sampling_params import SamplingParams

    llm = LLM(**dataclasses.asdict(dataclasses.replace(engine_args, enable_prefix_caching=caching)))
    core = llm.llm_engine.engine_core
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    def timed(params: SamplingParams) -> dict:
        if not llm.reset_prefix_cache():
            raise RuntimeError("the prefix cache could not be reset: a request still holds blocks")
        llm.generate([{"prompt_token_ids": p} for p in prefixes], first, use_tqdm=False)  # seen once
        before = core.stats()
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - t0
        after = core.stats()
        return dict(wall_s=wall, output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
                    cached_tokens=sum(o.num_cached_tokens or 0 for o in outs),
                    hit_tokens=after.prefix_cache_hits - before.prefix_cache_hits,
                    query_tokens=after.prefix_cache_queries - before.prefix_cache_queries)

    timed(first)  # warm-up: kernels, allocator pools
    first_runs = [timed(first) for _ in range(num_iters)]
    full_runs = [timed(full) for _ in range(num_iters)]
    del llm, core
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(prefix_caching=caching,
                all_first_tokens_ms=1e3 * statistics.median(r["wall_s"] for r in first_runs),
                wall_ms=1e3 * statistics.median(r["wall_s"] for r in full_runs),
                cached_prompt_tokens=first_runs[-1]["cached_tokens"],
                output_tokens=full_runs[-1]["output_tokens"], first_token_runs=first_runs, full_runs=full_runs)


def run(ns, engine_args: EngineArgs) -> dict:
    model, hf_config, device, dtype = resolve_target(engine_args)
    prefixes, prompts = prefix_workload(ns.num_prefixes, ns.requests_per_prefix, ns.prefix_len, ns.suffix_len,
                                        engine_args.seed, min(TOKEN_ID_LIMIT, hf_config.vocab_size))
    results = {mode: _run_mode(engine_args, MODES[mode], prefixes, prompts, ns.output_len, ns.num_iters)
               for mode in ns.modes}
    notes = []
    if (ns.num_prefixes, ns.requests_per_prefix, ns.prefix_len, ns.suffix_len, ns.output_len, ns.num_iters) != \
            (4, 16, 2048, 128, 64, 3):
        notes.append("NOT the BENCHMARKS.md workload (counts, lengths or repeats changed)")
    if device.type == "cpu":
        notes.append("CPU figures")
    return dict(kind="prefix", model=model, device=device_name(device), device_type=device.type,
                dtype=str(dtype).removeprefix("torch."), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                num_requests=len(prompts), num_prefixes=ns.num_prefixes, prefix_len=ns.prefix_len,
                suffix_len=ns.suffix_len, output_len=ns.output_len, num_iters=ns.num_iters, seed=engine_args.seed,
                results=results, notes=notes)


def report(r: dict) -> str:
    notes = f" [{'; '.join(r['notes'])}]" if r["notes"] else ""
    lines = [f"prefix on {r['device']}, {r['dtype']}{notes}: {r['num_requests']} requests, {r['num_prefixes']} "
             f"prefixes of {r['prefix_len']} + suffixes of {r['suffix_len']} tokens, median of {r['num_iters']}"]
    for mode, m in r["results"].items():
        lines.append(f"  prefix caching {mode:>3}: all first tokens {m['all_first_tokens_ms']:9.1f} ms | "
                     f"wall with {r['output_len']} output tokens {m['wall_ms']:9.1f} ms | "
                     f"{m['cached_prompt_tokens']:,} prompt tokens from the cache")
    if {"on", "off"} <= r["results"].keys():
        on, off = r["results"]["on"], r["results"]["off"]
        lines.append(f"  off / on: first tokens {off['all_first_tokens_ms'] / on['all_first_tokens_ms']:.2f}x, "
                     f"wall {off['wall_ms'] / on['wall_ms']:.2f}x")
    return "\n".join(lines)
