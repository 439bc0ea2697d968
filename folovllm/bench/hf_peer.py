"""The peer of every run: Hugging Face transformers on the same workload, given its best settings
(BENCHMARKS.md, "The peer in every run").

Throughput goes through transformers' continuous batching: the `ContinuousBatchingManager` that
`model.generate_batch` drives, entered through `model.continuous_batching_context_manager` so that
each request gets its own `max_new_tokens` (`generate_batch` takes one for all) and so that the
warm-up call and the timed call share one manager. Attention is `paged|sdpa` (flash-attn is not
installed on the GPU machine), CUDA graphs are on where there is CUDA, EOS is off
(`eos_token_id=-1`). Latency uses plain `model.generate` (eager), as in BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import time

import torch

from folovllm.bench.workloads import BenchRequest


def load_model(model: str, device: torch.device, dtype: torch.dtype, attn_implementation: str, seed: int = 0):
    """Random weights from the config (weights do not change speed), built on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    torch.manual_seed(seed)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if m.device.type == "cuda":
        torch.cuda.empty_cache()  # what initialization left reserved would shrink its KV cache
    return m.eval()


def _generation_config(temperature: float, max_new_tokens: int):
    from transformers import GenerationConfig

    # top_k=0 / top_p=1: no filtering, the same sampling as the engine's (the default top_k is 50).
    sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    return GenerationConfig(eos_token_id=-1, pad_token_id=0, max_new_tokens=max_new_tokens, **sample)


def _run_requests(manager, requests: list[BenchRequest]) -> list[int]:
    """Submit all requests to a running manager and wait for them; the generated lengths in order."""
    ids = [manager.add_request(r.prompt_token_ids, max_new_tokens=r.output_len, eos_token_id=-1)
           for r in requests]
    done = {}
    while len(done) < len(ids):
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f"transformers' continuous batching stopped with {len(ids) - len(done)} "
                                   "requests unfinished")
            continue
        if result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"transformers request {result.request_id} failed: {result.error}")
            done[result.request_id] = result
    return [len(done[i].generated_tokens) for i in ids]


def throughput(model, requests: list[BenchRequest], warmup: list[BenchRequest], temperature: float,
               use_cuda_graph: bool = True, max_memory_percent: float = 0.6,
               seed: int = 0) -> tuple[float, list[int], dict]:
    """Wall seconds of the timed call, generated lengths, and the settings used."""
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    cuda = model.device.type == "cuda"
    if cuda:
        # transformers sizes the cache from free GPU memory. Its default share (0.8 with a sampler)
        # left too little for its own CUDA-graph warm-up on an 80 GB H100 (OOM, graphs then captured
        # inside the timed run); 0.6 still holds the KV of the whole workload at once (~33 GB).
        cb_config = ContinuousBatchingConfig(use_cuda_graph=use_cuda_graph, max_memory_percent=max_memory_percent,
                                             seed=seed)
    else:  # on a CPU it would take most of RAM (and long to set up): size it to the workload
        bs = 32
        need = sum(-(-(len(r.prompt_token_ids) + r.output_len) // bs) for r in requests)
        # Headroom: with a cache that is just full enough, its safety margin admits prefills one by one.
        cb_config = ContinuousBatchingConfig(block_size=bs, num_blocks=2 * need + 8, max_batch_tokens=512, seed=seed)
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_token_ids) for r in requests),
                          max_generated_length=max(r.output_len for r in requests), num_requests=len(requests))
    gen = _generation_config(temperature, max(r.output_len for r in requests))
    # warmup (on CUDA) captures the CUDA graphs before the manager starts; our warm-up call then
    # runs real requests through it, untimed.
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb_config,
                                                   workload_hints=hints, block=True, timeout=30,
                                                   warmup=cuda) as manager:
        if warmup:
            _run_requests(manager, warmup)
        t0 = time.perf_counter()
        lengths = _run_requests(manager, requests)
        wall = time.perf_counter() - t0
        resolved = manager.continuous_batching_config
        settings = dict(api="continuous_batching_context_manager + ContinuousBatchingManager.add_request"
                        "(max_new_tokens=per request, eos_token_id=-1)",
                        attn_implementation=model.config._attn_implementation,
                        use_cuda_graph=list(resolved.use_cuda_graph),
                        use_async_batching=resolved.use_async_batching, block_size=resolved.block_size,
                        max_memory_percent=resolved.max_memory_percent,
                        num_blocks=resolved.num_blocks, max_batch_tokens=resolved.max_batch_tokens,
                        max_requests_per_batch=resolved.max_requests_per_batch)
    return wall, lengths, settings


class _TokenClock:
    """A generate() streamer that notes when the first new tokens arrive: transformers calls put()
    with the prompt, then once per step with that step's tokens."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def generate_timings(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first new token, seconds in all) of one eager `model.generate` of exactly
    new_tokens greedy tokens per prompt: both from the same call, so TPOT = (all - first) /
    (new_tokens - 1) cannot come out negative from two calls' noise."""
    ids = torch.tensor(prompts, device=model.device)
    gen = _generation_config(0.0, new_tokens)
    # eos_token_id=-1 is how transformers turns EOS off, and generate warns about it on every call.
    log = logging.getLogger("transformers.generation.utils")
    level = log.level
    log.setLevel(logging.ERROR)
    clock = _TokenClock(model.device)
    try:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen, streamer=clock)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        return (clock.first_token_at or end) - t0, end - t0
    finally:
        log.setLevel(level)
