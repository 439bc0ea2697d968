"""The throughput workload (BENCHMARKS.md): all requests at once, one untimed warm-up call first;
requests/s, output and total tokens/s, wall time, and the floor of the same run."""

from __future__ import annotations

import dataclasses
import time

import torch

from folovllm.bench.floor import ModelShape, describe, measure_ceilings, workload_floor
from folovllm.bench.workloads import TOKEN_ID_LIMIT, BenchRequest, throughput_workload
from folovllm.engine.arg_utils import EngineArgs

FULL_WORKLOAD_PROMPTS = 256
WARMUP_PROMPTS, WARMUP_TOKENS = 8, 16


def resolve_target(engine_args: EngineArgs):
    """(model path, HF config, device, dtype) as the engine will resolve them, so that the peer
    and the floor use the same model, device and dtype as the engine."""
    config = engine_args.create_engine_config()
    mc = config.model_config
    return mc.model, mc.hf_config, config.torch_device(), mc.dtype


def warmup_requests(requests: list[BenchRequest]) -> list[BenchRequest]:
    """A few of the workload's own prompts with short outputs: compiles kernels, fills allocator
    pools, and warms the caches of both prefill and decode before the clock starts."""
    return [dataclasses.replace(r, output_len=min(r.output_len, WARMUP_TOKENS)) for r in requests[:WARMUP_PROMPTS]]


def run_folovllm(engine_args: EngineArgs, requests: list[BenchRequest], temperature: float) -> dict:
    from folovllm.entrypoints.llm import LLM
    from folovllm.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**dataclasses.asdict(engine_args))
    startup = time.perf_counter() - t0

    def call(reqs):
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
        params = [SamplingParams(temperature=temperature, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
        return llm.generate(prompts, params, use_tqdm=False)

    call(warmup_requests(requests))
    t0 = time.perf_counter()
    outs = call(requests)  # returns once every token is back on the host: no sync needed
    wall = time.perf_counter() - t0
    return dict(wall_s=wall, output_lens=[len(o.outputs[0].token_ids) for o in outs], startup_s=startup,
                settings=dict(num_kv_blocks=llm.llm_engine.config.cache_config.num_gpu_blocks,
                              async_scheduling=llm.llm_engine.async_scheduling,
                              num_preemptions=llm.llm_engine.engine_core.stats().num_preemptions,
                              attention_backend=engine_args.attention_backend,
                              enforce_eager=engine_args.enforce_eager))


def run_hf(model: str, device: torch.device, dtype: torch.dtype, requests: list[BenchRequest], temperature: float,
           attn_implementation: str, use_cuda_graph: bool, max_memory_percent: float, seed: int) -> dict:
    from folovllm.bench import hf_peer

    t0 = time.perf_counter()
    m = hf_peer.load_model(model, device, dtype, attn_implementation, seed)
    startup = time.perf_counter() - t0
    wall, lengths, settings = hf_peer.throughput(m, requests, warmup_requests(requests), temperature, use_cuda_graph,
                                              max_memory_percent, seed)
    return dict(wall_s=wall, output_lens=lengths, startup_s=startup, settings=settings)


def run(ns, engine_args: EngineArgs) -> dict:
    model, hf_config, device, dtype = resolve_target(engine_args)
    # Ids below the vocabulary of a tiny test model too.
    limit = min(TOKEN_ID_LIMIT, hf_config.vocab_size)
    if getattr(ns, "workload", "throughput") == "serve":
        # The serve benchmark's requests, run offline: what the server at saturation is held to.
        from folovllm.bench.serve import serve_workload
        requests = serve_workload(ns.num_prompts, ns.input_len_range, ns.output_len_range, engine_args.seed, limit)
    else:
        requests = throughput_workload(ns.num_prompts, ns.input_len_range, ns.output_len_range, engine_args.seed,
                                       limit)
    ceilings = measure_ceilings(device, dtype)  # before the engine takes the memory
    if ns.backend == "folovllm":
        res = run_folovllm(engine_args, requests, ns.temperature)
    else:
        res = run_hf(model, device, dtype, requests, ns.temperature, ns.hf_attn_impl, ns.hf_cuda_graph,
                     ns.hf_max_memory_percent, engine_args.seed)
    floor = workload_floor(ModelShape.from_hf_config(hf_config, dtype),
                           ((len(r.prompt_token_ids), r.output_len) for r in requests), ceilings)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    output_tokens = sum(res["output_lens"])
    wall = res["wall_s"]
    notes = []
    standard = (tuple(ns.input_len_range), tuple(ns.output_len_range), engine_args.seed, ns.temperature) == \
        ((100, 1024), (100, 1024), 0, 0.6)
    if getattr(ns, "workload", "throughput") == "serve":
        notes.append("the serve workload's requests, offline")
    elif not standard or ns.num_prompts > FULL_WORKLOAD_PROMPTS:
        notes.append("NOT the BENCHMARKS.md workload (count, lengths, seed or temperature changed)")
    elif ns.num_prompts < FULL_WORKLOAD_PROMPTS:
        notes.append(f"SUBSET: the first {ns.num_prompts} of the {FULL_WORKLOAD_PROMPTS} requests")
    requested = sum(r.output_len for r in requests)
    if output_tokens != requested:
        notes.append(f"{output_tokens} output tokens but {requested} requested")
    if device.type == "cpu":
        notes.append("CPU figures")
    return dict(kind="throughput", backend=ns.backend, model=model, device=ceilings.device, device_type=device.type,
                dtype=str(dtype).removeprefix("torch."), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                num_requests=len(requests), input_len_range=list(ns.input_len_range),
                output_len_range=list(ns.output_len_range), seed=engine_args.seed, temperature=ns.temperature,
                prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                requested_output_tokens=requested,
                wall_s=wall, requests_per_s=len(requests) / wall, output_tokens_per_s=output_tokens / wall,
                total_tokens_per_s=(prompt_tokens + output_tokens) / wall, floor_s=floor["floor_s"],
                floor_fraction=floor["floor_s"] / wall, floor=floor, ceilings=dataclasses.asdict(ceilings),
                startup_s=res["startup_s"], settings=res["settings"], notes=notes)


def report(r: dict) -> str:
    notes = f" [{'; '.join(r['notes'])}]" if r["notes"] else ""
    return (f"throughput [{r['backend']}] on {r['device']} ({r['ceilings']['label']}), {r['dtype']}{notes}\n"
            f"  {r['num_requests']} requests, {r['prompt_tokens']:,} prompt + {r['output_tokens']:,} output tokens "
            f"(start-up {r['startup_s']:.1f} s)\n"
            f"  wall {r['wall_s']:.2f} s | {r['requests_per_s']:.2f} req/s | "
            f"{r['output_tokens_per_s']:,.0f} output tok/s | {r['total_tokens_per_s']:,.0f} total tok/s\n"
            f"  {describe(r['floor'])}\n"
            f"  floor fraction {r['floor_fraction']:.1%}")
