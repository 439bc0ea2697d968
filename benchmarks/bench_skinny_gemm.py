"""The decode matmuls of Qwen3-0.6B at small batch: cuBLAS (F.linear) against the skinny Triton
kernel (folovllm/model_executor/layers/skinny_gemm.py) over a sweep of its tile configurations.
Times with CUDA events (median of many repeats, weights cycled so they are not served from L2),
prints achieved bandwidth against a measured copy, the best configuration per shape, and a short
table last.

    PYTHONPATH=. python3 benchmarks/bench_skinny_gemm.py [--rows 1 2 4 8 16] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
import torch.nn.functional as F

from folovllm.model_executor.layers import skinny_gemm as sg

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}


def timed(fn, reps: int = 11, calls: int = 48) -> float:
    """Microseconds of one call on the GPU: `calls` back-to-back calls captured in one CUDA graph
    (as the engine runs them: no host launch cost), median over `reps` replays."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (timed(lambda: dst.copy_(src), 5, 2) * 1e-6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--sweep", action="store_true", help="try every tile configuration")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    configs = [sg.default_config(0, 0)]
    if args.sweep:
        configs = list(itertools.product([16, 32, 64], [128, 256, 512], [4, 8], [3, 4, 5]))
    rows_out = []
    for name, (n, k) in SHAPES.items():
        # Eight copies of the weight (> L2) cycled through, so every call reads HBM.
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(8)]
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            it = itertools.cycle(ws)
            t_cublas = timed(lambda: F.linear(x, next(it)))
            best = None
            for cfg in configs:
                try:
                    out = sg.skinny_gemm(x, ws[0], config=cfg)
                except Exception as e:  # a tile too large for shared memory
                    print(f"  {name} m={m} {cfg}: {type(e).__name__}")
                    continue
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                assert err < 2e-2, (name, m, cfg, err)
                t = timed(lambda: sg.skinny_gemm(x, next(it), config=cfg))
                if best is None or t < best[0]:
                    best = (t, cfg)
            t, cfg = best
            gb = n * k * 2
            rows_out.append((name, m, t_cublas, t, cfg, gb / (t_cublas * 1e-6) / bw, gb / (t * 1e-6) / bw))
    print(f"\n{'shape':8s} {'rows':>4s} {'cuBLAS us':>9s} {'skinny us':>9s} {'cuBLAS bw':>9s} {'skinny bw':>9s}  best config")
    for name, m, tc, ts, cfg, fc, fs in rows_out:
        print(f"{name:8s} {m:4d} {tc:9.2f} {ts:9.2f} {fc:9.0%} {fs:9.0%}  {cfg}")


if __name__ == "__main__":
    main()
