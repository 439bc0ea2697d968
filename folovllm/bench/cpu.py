"""`folovllm bench cpu`: what a user of a CPU sees, on one model (by default the real GGUF one).

- batch 1: one prompt of --prompt-len (128) random tokens, --output-len (64) greedy tokens, EOS
  ignored: TTFT (first token - arrival) and decode tok/s ((N - 1) / (finished - first token)),
  the median over --num-iters runs after a warm-up;
- a batch of --batch-size (16) prompts of ~--batch-prompt-len (100) tokens, --output-len tokens
  each, all submitted at once (continuous batching): output tok/s over the wall time;
- peak RSS of the process (resource.getrusage: the high-water mark since it started, loading
  included, taken before the bandwidth measurement);
- the weight bytes one decode step reads, next to the memory bandwidth of a large tensor copy
  (bytes read + written), and the decode tok/s that bandwidth allows at most (the floor).

The engine flags are those of `folovllm generate`. The KV cache is sized for the workload
(max_num_seqs = the batch, max_model_len = the longest request rounded up to 256) unless
--max-num-seqs / --max-model-len say otherwise.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time

import numpy as np
import torch

from folovllm.bench.floor import device_name
from folovllm.bench.workloads import TOKEN_ID_LIMIT, random_prompts


def copy_bandwidth(num_bytes: int, iters: int = 5) -> float:
    """Bytes/s of dst.copy_(src) for one `num_bytes` tensor (read + written: 2 x num_bytes per
    copy), the best of `iters` after a warm-up. Large enough not to fit any cache."""
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * num_bytes / best


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _model_of(llm):
    """The engine's model, when it runs in this process (one rank); else None."""
    worker = getattr(llm.llm_engine.engine_core.executor, "driver_worker", None)
    runner = getattr(worker, "model_runner", None)
    return getattr(runner, "model", None)


def run(ns, engine_args) -> dict:
    from folovllm.entrypoints.llm import LLM
    from folovllm.model_executor.model_loader import weight_bytes, weight_format
    from folovllm.sampling_params import SamplingParams

    for name, value in (("--prompt-len", ns.prompt_len), ("--output-len", ns.output_len),
                        ("--batch-size", ns.batch_size), ("--batch-prompt-len", ns.batch_prompt_len),
                        ("--num-iters", ns.num_iters), ("--copy-mib", ns.copy_mib)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if ns.output_len < 2:
        raise ValueError(f"--output-len must be >= 2 (decode tok/s needs a token after the first), got {ns.output_len}")
    if engine_args.device not in ("auto", "cpu"):
        raise ValueError(f"bench cpu runs on the CPU; leave out --device (got {engine_args.device!r})")
    longest = max(ns.prompt_len, ns.batch_prompt_len + max(1, ns.batch_prompt_len // 25)) + ns.output_len
    engine_args = dataclasses.replace(
        engine_args, device="cpu",
        max_model_len=engine_args.max_model_len or -(-longest // 256) * 256,
        max_num_seqs=engine_args.max_num_seqs or ns.batch_size)
    t0 = time.perf_counter()
    llm = LLM(**dataclasses.asdict(engine_args))
    startup = time.perf_counter() - t0
    rss_after_load = peak_rss_bytes()
    config = llm.llm_engine.config
    mc = config.model_config
    limit = min(TOKEN_ID_LIMIT, mc.vocab_size)
    rng = np.random.default_rng(engine_args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)

    llm.generate([{"prompt_token_ids": p} for p in random_prompts(1, 16, rng, limit)],
                 SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    single = []
    for _ in range(ns.num_iters):
        [out] = llm.generate([{"prompt_token_ids": random_prompts(1, ns.prompt_len, rng, limit)[0]}], params,
                             use_tqdm=False)
        m, n = out.metrics, len(out.outputs[0].token_ids)
        single.append(dict(ttft_s=m.first_token_time - m.arrival_time,
                           decode_tok_s=(n - 1) / (m.finished_time - m.first_token_time)))

    # ~batch_prompt_len tokens each: lengths spread over +-4% so the prompts are not all alike.
    spread = max(1, ns.batch_prompt_len // 25)
    lengths = rng.integers(max(1, ns.batch_prompt_len - spread), ns.batch_prompt_len + spread, endpoint=True,
                           size=ns.batch_size)
    prompts = [{"prompt_token_ids": rng.integers(0, limit, size=int(n)).tolist()} for n in lengths]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    batch_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    peak_rss = peak_rss_bytes()  # before the bandwidth copy, whose two tensors would top it

    model = _model_of(llm)
    sizes = weight_bytes(model) if model is not None else {"total": 0, "per_token": 0}
    bandwidth = copy_bandwidth(ns.copy_mib << 20)
    per_token = sizes["per_token"]
    return dict(
        kind="cpu", model=mc.model, device=device_name(config.torch_device()), label="CPU",
        date=time.strftime("%Y-%m-%d %H:%M:%S"), num_threads=torch.get_num_threads(),
        quantization=mc.quantization or "none", dtype=str(mc.dtype).removeprefix("torch."),
        weights=weight_format(mc), startup_s=startup,
        batch1=dict(prompt_len=ns.prompt_len, output_len=ns.output_len, runs=single,
                    ttft_s=statistics.median(r["ttft_s"] for r in single),
                    decode_tok_s=statistics.median(r["decode_tok_s"] for r in single)),
        batch=dict(batch_size=ns.batch_size, prompt_lens=[int(n) for n in lengths], output_len=ns.output_len,
                   output_tokens=batch_tokens, wall_s=wall, output_tok_s=batch_tokens / wall),
        peak_rss_bytes=peak_rss, peak_rss_after_load_bytes=rss_after_load,
        weight_bytes=sizes["total"], weight_bytes_per_token=per_token,
        copy_bytes=ns.copy_mib << 20, bandwidth_bytes_s=bandwidth,
        floor_decode_tok_s=bandwidth / per_token if per_token else None)


def report(r: dict) -> str:
    b1, b = r["batch1"], r["batch"]
    floor = r["floor_decode_tok_s"]
    floor_text = (f"{r['weight_bytes_per_token'] / 1e9:.3f} GB of weights read per decode token at "
                  f"{r['bandwidth_bytes_s'] / 1e9:.1f} GB/s (a {r['copy_bytes'] >> 20} MiB copy, read + write): "
                  f"floor {floor:.1f} tok/s, batch-1 decode at {b1['decode_tok_s'] / floor:.0%} of it"
                  if floor else "weight bytes unknown (the model runs in other processes)")
    return "\n".join([
        f"bench cpu [CPU figures] on {r['device']}: {r['model']}",
        f"  weights: {r['weights']}; {r['weight_bytes'] / 1e9:.2f} GB in memory; start-up {r['startup_s']:.1f} s",
        f"  batch 1: prompt {b1['prompt_len']}, {b1['output_len']} tokens: TTFT {b1['ttft_s']:.3f} s, "
        f"decode {b1['decode_tok_s']:.1f} tok/s (median of {len(b1['runs'])})",
        f"  batch {b['batch_size']}: prompts of {min(b['prompt_lens'])}-{max(b['prompt_lens'])} tokens, "
        f"{b['output_len']} tokens each: {b['output_tok_s']:.1f} output tok/s "
        f"({b['output_tokens']} in {b['wall_s']:.2f} s)",
        f"  peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB ({r['peak_rss_after_load_bytes'] / 1e9:.2f} GB after loading)",
        f"  {floor_text}",
    ])
