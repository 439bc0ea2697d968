"""The physical floor of a run (BENCHMARKS.md, "The floor"): device ceilings measured in the same
run, and the bytes and FLOPs the workload cannot avoid.

    memory floor  = (weight bytes x decode steps of the longest request
                     + KV bytes the decode steps read + KV bytes written) / bandwidth
    compute floor = (2 x non-embedding params x all tokens + 2 x LM-head params x output tokens
                     + attention FLOPs) / matmul FLOP/s
    floor = max of the two; floor fraction = floor / measured time

A request with P prompt and O output tokens runs T = P + O - 1 tokens through the model (the
last sampled token is never fed back; "all tokens" above is the sum of T): the prefill makes output token 1 and decode step
k = 1..O-1 feeds token P + k, which attends to (reads the KV of) its whole context of P + k tokens.
All requests of the workload run concurrently, so the run takes at least as many weight reads as
the longest request has decode steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    non_embedding_params: int
    lm_head_params: int  # vocab x hidden, tied or not: the logits matmul reads all of it
    dtype_bytes: int

    @classmethod
    def from_hf_config(cls, config, dtype: torch.dtype) -> "ModelShape":
        """Parameter counts from the transformers model itself, built on the meta device (no
        memory, exact for any architecture)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())  # a tied LM head is counted once
        embed = model.get_input_embeddings().weight.numel()
        head = model.get_output_embeddings().weight
        tied = head is model.get_input_embeddings().weight
        heads = config.num_attention_heads
        return cls(num_layers=config.num_hidden_layers, num_heads=heads,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   non_embedding_params=total - embed - (0 if tied else head.numel()),
                   lm_head_params=head.numel(), dtype_bytes=DTYPE_BYTES[dtype])

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes * self.num_layers

    @property
    def weight_bytes(self) -> int:
        """What one decode step must read: every weight except the embedding table, of which a
        step reads only its rows (when tied, the LM head reads the table anyway)."""
        return (self.non_embedding_params + self.lm_head_params) * self.dtype_bytes


@dataclass(frozen=True)
class Ceilings:
    device: str
    label: str  # "GPU" or "CPU": a CPU floor is a CPU figure
    bandwidth: float  # bytes/s, read + write of a device-to-device copy
    flops: float  # FLOP/s of a square matmul in the run's dtype
    copy_bytes: int
    matmul_n: int
    dtype: str


def workload_floor(shape: ModelShape, lengths: Iterable[tuple[int, int]], ceilings: Ceilings) -> dict:
    """The floor of running all (prompt_len, output_len) requests concurrently, with its parts."""
    lengths = list(lengths)
    decode_steps = max(o for _, o in lengths) - 1
    tokens = kv_read = attended = output_tokens = 0
    for p, o in lengths:
        t = p + o - 1
        tokens += t
        output_tokens += o
        kv_read += t * (t + 1) // 2 - p * (p + 1) // 2  # sum of P + k for k = 1..O-1
        attended += t * (t + 1) // 2  # keys attended, prefill (causal) and decode together
    weight_read = shape.weight_bytes * decode_steps
    kv_read_bytes = shape.kv_bytes_per_token * kv_read
    kv_write_bytes = shape.kv_bytes_per_token * tokens
    # QK^T and PV: 2 FLOPs per multiply-add, head_dim multiply-adds each, per head, key and layer.
    attn_flops = 4 * shape.num_heads * shape.head_dim * shape.num_layers * attended
    linear_flops = 2 * shape.non_embedding_params * tokens + 2 * shape.lm_head_params * output_tokens
    memory_s = (weight_read + kv_read_bytes + kv_write_bytes) / ceilings.bandwidth
    compute_s = (linear_flops + attn_flops) / ceilings.flops
    return dict(memory_floor_s=memory_s, compute_floor_s=compute_s, floor_s=max(memory_s, compute_s),
                bound="memory" if memory_s >= compute_s else "compute",
                decode_steps=decode_steps, weight_read_bytes=weight_read, kv_read_bytes=kv_read_bytes,
                kv_write_bytes=kv_write_bytes, forward_tokens=tokens, output_tokens=output_tokens,
                linear_flops=linear_flops, attention_flops=attn_flops,
                kv_bytes_per_token=shape.kv_bytes_per_token, weight_bytes=shape.weight_bytes,
                non_embedding_params=shape.non_embedding_params, lm_head_params=shape.lm_head_params,
                bandwidth=ceilings.bandwidth, flops=ceilings.flops, ceilings_label=ceilings.label)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _median_time(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> Ceilings:
    """Bandwidth from a device-to-device copy (bytes read + written) and FLOP/s from a square
    matmul: 1 GiB and 8192^3 on a GPU, 64 MiB and 1024^3 on a CPU (whose figures are labelled CPU)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    copy_bytes, n = (2**30, 8192) if gpu else (2**26, 1024)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_s = _median_time(lambda: dst.copy_(src), device, warmup=3, iters=20 if gpu else 5)
    del src, dst
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm_s = _median_time(lambda: torch.mm(a, b), device, warmup=3, iters=20 if gpu else 5)
    del a, b
    if gpu:
        torch.cuda.empty_cache()
    return Ceilings(device=device_name(device), label="GPU" if gpu else "CPU", bandwidth=2 * copy_bytes / copy_s,
                    flops=2 * n**3 / mm_s, copy_bytes=copy_bytes, matmul_n=n, dtype=str(dtype).removeprefix("torch."))


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def describe(floor: dict) -> str:
    return (f"floor {floor['floor_s']:.4g} s ({floor['bound']}-bound; memory {floor['memory_floor_s']:.4g} s: "
            f"{_si(floor['weight_read_bytes'], 'B')} weights + {_si(floor['kv_read_bytes'], 'B')} KV read + "
            f"{_si(floor['kv_write_bytes'], 'B')} KV written at {_si(floor['bandwidth'], 'B/s')}; compute "
            f"{floor['compute_floor_s']:.4g} s: {_si(floor['linear_flops'] + floor['attention_flops'], 'FLOP')} at "
            f"{_si(floor['flops'], 'FLOP/s')}; {floor['ceilings_label']} ceilings)")


def main(argv: list[str] | None = None) -> int:
    """Measure this device's ceilings and print them with the floor of the default throughput
    workload on the bench model."""
    from transformers import AutoConfig

    from folovllm.bench.workloads import throughput_workload

    p = argparse.ArgumentParser(prog="python -m folovllm.bench.floor", description=main.__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on a CPU (the engine's 'auto')")
    p.add_argument("--model", default=None, help="config folder (default: the bench Qwen3-0.6B config)")
    p.add_argument("--output-json", default=None)
    ns = p.parse_args(argv)
    from folovllm.bench.workloads import default_bench_model

    gpu = ns.device.startswith("cuda")
    dtype = getattr(torch, ns.dtype) if ns.dtype else (torch.bfloat16 if gpu else torch.float32)
    ceilings = measure_ceilings(ns.device, dtype)
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(ns.model or default_bench_model()), dtype)
    floor = workload_floor(shape, ((len(r.prompt_token_ids), r.output_len) for r in throughput_workload()), ceilings)
    print(f"{ceilings.label} ceilings on {ceilings.device}: {_si(ceilings.bandwidth, 'B/s')} copy (read + write, "
          f"{ceilings.copy_bytes >> 20} MiB), {_si(ceilings.flops, 'FLOP/s')} {ceilings.dtype} matmul "
          f"({ceilings.matmul_n}^3)")
    print(f"throughput workload: {describe(floor)}; {floor['output_tokens'] / floor['floor_s']:,.0f} output tok/s")
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(dict(kind="ceilings", ceilings=asdict(ceilings), throughput_floor=floor), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
