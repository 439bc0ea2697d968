"""The GPTQ kernel against cuBLAS bf16 on the projections of Qwen3-8B (BENCHMARKS.md's gptq
workload): 4-bit g128 weights through gptq_matmul (folovllm/model_executor/layers/quantization/
kernels/gptq_triton.py) vs the same shapes dense through F.linear, timed in CUDA graphs (as the
engine runs them) with several copies of each weight cycled so that no call is served from L2,
and the weight bytes each call reads against a measured copy bandwidth. --sweep also tries a grid
of tile configurations and split-K factors per shape and row count and prints the best.

    PYTHONPATH=. python3 benchmarks/bench_gptq_gemm.py [--rows 1 4 16 64 512] [--act-order] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from benchmarks.bench_skinny_gemm import timed
from folovllm.bench.floor import measure_ceilings
from folovllm.model_executor.layers.quantization.kernels import gptq_triton as gq

# name: (in K, out N) of Qwen3-8B's projections (hidden 4096, 32 + 2 x 8 heads of 128, inter 12288)
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}
L2_BYTES = 60 << 20  # more than an H100/H200's L2: the copies cycled per shape exceed this


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
    return gq.gptq_prepare(qweight, qzeros, scales, g_idx, bits, group)


def copies(make, nbytes: int) -> list:
    return [make() for _ in range(max(2, -(-3 * L2_BYTES // nbytes)))]


def swap_configs(m: int) -> list[tuple[gq.GPTQKernelConfig, int | None]]:
    """The swap kernel's grid (the weight tile as the dot's first operand): BLOCK_M the bucket of
    m (two sizes above 64 rows), BLOCK_K one group of 128."""
    bms = [16] if m <= 16 else [32] if m <= 32 else [64] if m <= 64 else [64, 128]
    return [(gq.GPTQKernelConfig(bm, bn, 128, warps, stages, unpack=unpack, kind="swap"), None)
            for bm, bn, warps, stages, unpack in itertools.product(bms, [64, 128, 256], [4, 8], [3, 4],
                                                                   ["nibble", "reshape"])]


def sweep_configs(m: int, kinds: tuple[str, ...] = ("gemv", "dot", "swap", "dequant")
                  ) -> list[tuple[gq.GPTQKernelConfig, int | None]]:
    """The grid --sweep tries for m rows: GEMV tiles up to 4 rows, tensor-core tiles from 2 rows
    (with each unpacking, and the swap kernel), and dequantize-then-cuBLAS for big m; only the
    given kinds."""
    return [(c, sp) for c, sp in _sweep_configs(m) + (swap_configs(m) if m > 1 else []) if c.kind in kinds]


def _sweep_configs(m: int) -> list[tuple[gq.GPTQKernelConfig, int | None]]:
    C = gq.GPTQKernelConfig
    out = []
    if m <= 4:  # the GEMV kernel (one program row per row of x); above GEMV_MAX_ROWS, the dot tiles too
        for bn, bk, warps in itertools.product([256, 512, 1024, 2048], [32, 64, 128], [4, 8]):
            if bn * bk // 8 // (32 * warps) > 64:  # packed words per thread: beyond this they spill
                continue
            for split in [None, 4, 8, 16, 32, 64]:
                out.append((C(m, bn, bk, warps, 1, kind="gemv"), split))
    if 1 < m <= 64:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        for bn, bk, warps, stages in itertools.product([32, 64, 128], [128, 256], [4], [3, 4]):
            for split in [None, 1, 4, 8]:
                out.append((C(bm, bn, bk, warps, stages), split))
        out += [(C(bm, 64, 64, 4, 4, unpack="reshape"), None), (C(bm, 64, 64, 4, 4, unpack="gather"), None)]
    elif m > 64:
        for bm, bn, warps, stages, unpack in itertools.product([64, 128], [64, 128], [4, 8], [3, 4],
                                                               ["nibble", "reshape"]):
            out.append((C(bm, bn, 128 if unpack == "nibble" else 64, warps, stages, unpack=unpack), 1))
        out += [(C(0, bn, 128, warps, kind="dequant"), 1) for bn in (64, 128, 256) for warps in (4, 8)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 512])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="try a grid of tile configurations too")
    ap.add_argument("--sweep-rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--sweep-kinds", nargs="+", default=["gemv", "dot", "swap", "dequant"],
                    help="kernel kinds the sweep tries (default: all)")
    args = ap.parse_args()
    bw = measure_ceilings("cuda").bandwidth  # the copy ceiling every benchmark reports against
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; {args.bits}-bit g{args.group_size}"
          f"{' act-order' if args.act_order else ''} vs bf16", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows, best_rows = [], []
    for name, (k, n) in SHAPES.items():
        quant_bytes = k * n * args.bits // 8 + (k // args.group_size) * n * (16 + args.bits) // 8
        qs = copies(lambda: quantized(k, n, args.bits, args.group_size, args.act_order, gen), quant_bytes)
        ds = copies(lambda: torch.randn(n, k, dtype=torch.bfloat16, device="cuda"), 2 * n * k)
        w0 = qs[0]
        dense0 = gq.gptq_dequantize(w0.qweight, w0.qzeros, w0.scales, w0.g_idx, args.bits, args.group_size).float()
        for m in args.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            xp = x if w0.perm is None else x[:, w0.perm.long()]
            ref = xp.float() @ dense0
            err = ((w0.matmul(x).float() - ref).norm() / ref.norm()).item()
            iq, idn = itertools.cycle(qs), itertools.cycle(ds)
            t_q = timed(lambda: next(iq).matmul(x))
            t_d = timed(lambda: F.linear(x, next(idn)))
            rows.append((name, m, t_d, t_q, quant_bytes / (t_q * 1e-6) / bw, 2 * n * k / (t_d * 1e-6) / bw, err))
            if args.sweep and m in args.sweep_rows:
                best, timings = None, []
                for cfg, split in sweep_configs(m, tuple(args.sweep_kinds)):
                    try:
                        e = ((w0.matmul(x, split_k=split, config=cfg).float() - ref).norm() / ref.norm()).item()
                        t = timed(lambda: next(iq).matmul(x, split_k=split, config=cfg))
                    except Exception as exc:  # a tile too large for shared memory
                        print(f"  {name} m={m} {cfg} split={split}: {type(exc).__name__}", flush=True)
                        continue
                    assert e < 1e-2, (name, m, cfg, split, e)
                    timings.append((t, cfg, split))
                    if best is None or t < best[0]:
                        best = (t, cfg, split)
                best_rows.append((name, m, t_q, *best))
                print(f"  {name} m={m}: default {t_q:.1f} us, best {best[0]:.1f} us {best[1]} split={best[2]}",
                      flush=True)
                # the best of each kind, to choose where one hands over to the next
                for kind in ("gemv", "dot", "swap", "dequant"):
                    ts = [(t, c, sp) for t, c, sp in timings if c.kind == kind]
                    if ts:
                        t, c, sp = min(ts, key=lambda r: r[0])
                        print(f"    best {kind}: {t:.1f} us {c} split={sp}", flush=True)
    if best_rows:
        print(f"\n{'shape':<8} {'rows':>5} {'default us':>10} {'best us':>8} {'best BW %':>9}  best config")
        for name, m, t_q, t, cfg, split in best_rows:
            k, n = SHAPES[name]
            qb = k * n * args.bits // 8 + (k // args.group_size) * n * (16 + args.bits) // 8
            print(f"{name:<8} {m:>5} {t_q:>10.1f} {t:>8.1f} {qb / (t * 1e-6) / bw:>9.0%}  {cfg.kind} "
                  f"bm={cfg.block_m} bn={cfg.block_n} bk={cfg.block_k} w={cfg.num_warps} s={cfg.num_stages} "
                  f"{cfg.unpack} split={split}")
    print(f"\n{'shape':<8} {'rows':>5} {'bf16 us':>9} {'gptq us':>9} {'speed-up':>9} {'gptq BW %':>10} "
          f"{'bf16 BW %':>10} {'rel err':>9}")
    for name, m, t_d, t_q, frac, frac_d, err in rows:
        print(f"{name:<8} {m:>5} {t_d:>9.1f} {t_q:>9.1f} {t_d / t_q:>8.2f}x {frac:>9.0%} {frac_d:>10.0%} {err:>9.1e}")


if __name__ == "__main__":
    main()
