"""The GPTQ kernel against cuBLAS bf16 on the projections of Qwen3-8B (BENCHMARKS.md's gptq
workload): 4-bit g128 weights through gptq_matmul (folovllm/model_executor/layers/quantization/
kernels/gptq_triton.py) vs the same shapes dense through F.linear, timed in CUDA graphs (as the
engine runs them), with the weight bytes each reads against a measured copy bandwidth.

    PYTHONPATH=. python3 benchmarks/bench_gptq_gemm.py [--rows 1 4 16 64 512] [--act-order]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.bench_skinny_gemm import copy_bandwidth, timed
from folovllm.model_executor.layers.quantization.kernels import gptq_triton as gq

# name: (in K, out N) of Qwen3-8B's projections (hidden 4096, 32 + 2 x 8 heads of 128, inter 12288)
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}


def quantized(k: int, n: int, bits: int, group: int, act_order: bool, gen: torch.Generator):
    q = torch.randint(0, 2 ** bits, (k, n), generator=gen)
    groups = k // group
    z = torch.randint(0, 2 ** bits, (groups, n), generator=gen)
    qweight = gq.pack_rows(q, bits).cuda()
    qzeros = gq.pack_rows(z.T.contiguous(), bits).T.contiguous().cuda()  # packed along N
    scales = (torch.rand(groups, n, generator=gen) * 0.01).half().cuda()
    g_idx = None
    if act_order:
        g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=gen)].int().cuda()
    return qweight, qzeros, scales, g_idx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 512])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; {args.bits}-bit g{args.group_size}"
          f"{' act-order' if args.act_order else ''} vs bf16")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (k, n) in SHAPES.items():
        qw, qz, sc, g = quantized(k, n, args.bits, args.group_size, args.act_order, gen)
        dense = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        quant_bytes = qw.numel() * 4 + qz.numel() * 4 + sc.numel() * 2
        for m in args.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = x.float() @ gq.gptq_dequantize(qw, qz, sc, g, args.bits, args.group_size).float()
            out = gq.gptq_matmul(x, qw, qz, sc, g, args.bits, args.group_size)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            t_q = timed(lambda: gq.gptq_matmul(x, qw, qz, sc, g, args.bits, args.group_size))
            t_d = timed(lambda: F.linear(x, dense))
            rows.append((name, m, t_d, t_q, quant_bytes / (t_q * 1e-6) / bw, err))
    print(f"\n{'shape':<8} {'rows':>5} {'bf16 us':>9} {'gptq us':>9} {'speed-up':>9} {'gptq BW %':>10} {'rel err':>9}")
    for name, m, t_d, t_q, frac, err in rows:
        print(f"{name:<8} {m:>5} {t_d:>9.1f} {t_q:>9.1f} {t_d / t_q:>8.2f}x {frac:>9.0%} {err:>9.1e}")


if __name__ == "__main__":
    main()
