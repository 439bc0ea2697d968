"""Decode-attention bandwidth microbenchmark for the Triton backend (CUDA only).

Qwen3-0.6B attention shapes: 16 query heads, 8 KV heads, head_dim 128, bf16, block_size 16.
  * decode 256 x 1024: KV bytes read (256 * 1024 * 8 * 128 * 2 B, for K and for V) / median time,
    against a large device-to-device copy measured in the same run (bytes read + written).
  * decode 1 x 8192: the flash-decoding (split) path, and the plain decode path for comparison.
  * prefill 2048 and 8192: one prompt, TFLOP/s counted over the causal half (4 * L^2/2 * D * H),
    with torch SDPA on contiguous tensors as a yardstick.
Times are triton.testing.do_bench medians (CUDA events; do_bench clears L2 before every call, so
the 34 MB KV of the 1 x 8k case is read from HBM too). Blocks are shuffled over the pool.

  python benchmarks/bench_attention.py            # the table
  python benchmarks/bench_attention.py --sweep    # also tile sweeps and the split crossover
  python benchmarks/bench_attention.py --crossover  # the table and the split/decode crossover
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import replace

import torch
import triton
from triton.testing import do_bench

from folovllm.attention.ops.triton_reshape_and_cache import reshape_and_cache
from folovllm.attention.ops.triton_unified_attention import (DECODE_CONFIG, PREFILL_CONFIG, AttentionConfig,
                                                             choose_config, unified_attention)

H, KVH, D, BS = 16, 8, 128, 16
DTYPE = torch.bfloat16


def make_batch(reqs, seed=0):
    """reqs [(q_len, seq_len)] -> query, kv_cache, query_start_loc, seq_lens, block_table."""
    rng = random.Random(seed)
    nblocks = [-(-s // BS) for _, s in reqs]
    pool = list(range(sum(nblocks)))
    rng.shuffle(pool)
    bt = torch.zeros(len(reqs), max(nblocks), dtype=torch.int32)
    for i, nb in enumerate(nblocks):
        bt[i, :nb], pool = torch.tensor(pool[:nb], dtype=torch.int32), pool[nb:]
    qsl = [0]
    for q, _ in reqs:
        qsl.append(qsl[-1] + q)
    dev = "cuda"
    kv_cache = torch.randn(2, sum(nblocks), BS, KVH, D, dtype=DTYPE, device=dev)
    query = torch.randn(qsl[-1], H, D, dtype=DTYPE, device=dev)
    return (query, kv_cache, torch.tensor(qsl, dtype=torch.int32, device=dev),
            torch.tensor([s for _, s in reqs], dtype=torch.int32, device=dev), bt.to(dev))


def time_attention(reqs, path=None, config=None):
    query, kv_cache, qsl, seq_lens, bt = make_batch(reqs)
    out = torch.empty_like(query)
    max_q = max(q for q, _ in reqs)
    fn = lambda: unified_attention(query, kv_cache, out, qsl, seq_lens, bt, D ** -0.5, max_q,
                                   path=path, config=config)
    fn()
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3   # seconds


def kv_bytes(reqs):
    return sum(s for _, s in reqs) * KVH * D * 2 * 2


def copy_bandwidth():
    src = torch.randn(512 * 1024 * 1024, dtype=DTYPE, device="cuda")   # 1 GiB
    dst = torch.empty_like(src)
    t = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median") * 1e-3
    return 2 * src.numel() * src.element_size() / t


def prefill_numbers(seq_len):
    reqs = [(seq_len, seq_len)]
    t = time_attention(reqs)
    flops = 4 * H * D * seq_len * (seq_len + 1) / 2
    q = torch.randn(1, H, seq_len, D, dtype=DTYPE, device="cuda")
    k = torch.randn(1, KVH, seq_len, D, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    t_sdpa = do_bench(sdpa, warmup=25, rep=200, return_mode="median") * 1e-3
    # The cache write of the same prompt, for scale.
    key = torch.randn(seq_len, KVH, D, dtype=DTYPE, device="cuda")
    cache = torch.empty(2, seq_len // BS + 1, BS, KVH, D, dtype=DTYPE, device="cuda")
    slots = torch.randperm(seq_len, device="cuda")
    t_write = do_bench(lambda: reshape_and_cache(key, key, cache, slots), warmup=25, rep=200,
                       return_mode="median") * 1e-3
    return t, flops, t_sdpa, t_write


def _sweep(results, key, title, reqs, path, configs, unit):
    print(f"\n# {title}")
    for cfg in configs:
        t = time_attention(reqs, path, cfg)
        val = kv_bytes(reqs) / t / 1e9 if unit == "GB/s" else \
            4 * H * D * sum(q * (2 * s - q + 1) / 2 for q, s in reqs) / t / 1e12
        print(f"{cfg}: {val:7.1f} {unit}  {t * 1e6:8.1f} us")
        results.setdefault(key, []).append([str(cfg), val, t])


def crossover(results):
    """Split (the chosen segment count, and twice that) against the plain decode path."""
    print("\n# split vs plain decode (us); auto = choose_config's path and segments")
    for ctx in (1024, 4096, 8192):
        for b in (1, 4, 8, 16, 32, 48, 64):
            reqs = [(1, ctx)] * b
            auto, cfg = choose_config(b, KVH, 1, torch.device("cuda"))
            seg = cfg.num_segments if auto == "split" else 2
            ts = time_attention(reqs, "split", replace(DECODE_CONFIG, num_segments=seg))
            ts2 = time_attention(reqs, "split", replace(DECODE_CONFIG, num_segments=min(2 * seg, 64)))
            td = time_attention(reqs, "decode")
            best = min(ts, ts2, td)
            print(f"ctx={ctx:5d} batch={b:3d}: split({seg:2d}) {ts * 1e6:7.1f}  split({min(2 * seg, 64):2d}) "
                  f"{ts2 * 1e6:7.1f}  decode {td * 1e6:7.1f}  auto={auto:6s} {kv_bytes(reqs) / best / 1e9:5.0f} GB/s best")
            results.setdefault("crossover", []).append([ctx, b, seg, ts, ts2, td, auto])


def sweep(results):
    C = AttentionConfig
    _sweep(results, "sweep_decode", "decode tiles, 256 x 1024", [(1, 1024)] * 256, "decode",
           [C(16, bn, nw, ns) for bn, nw, ns in [(64, 2, 3), (64, 2, 2), (64, 2, 4), (32, 2, 3), (128, 2, 2),
                                                  (128, 2, 3), (64, 4, 2), (128, 4, 2), (64, 1, 3)]], "GB/s")
    _sweep(results, "sweep_split", "split segments and tiles, 1 x 8192", [(1, 8192)], "split",
           [C(16, bn, nw, ns, seg) for seg in (16, 32, 64)
            for bn, nw, ns in [(64, 2, 3), (32, 2, 3), (64, 4, 2), (32, 4, 3)]], "GB/s")

    crossover(results)

    prefill_cfgs = [C(bm, bn, nw, ns) for bm, bn, nw, ns in
                    [(64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2), (64, 64, 8, 3), (64, 32, 4, 3),
                     (128, 128, 8, 2), (128, 64, 4, 3), (32, 64, 4, 3)]]
    _sweep(results, "sweep_prefill", "prefill tiles, 2048 tokens", [(2048, 2048)], "general", prefill_cfgs, "TFLOP/s")
    _sweep(results, "sweep_prefill_8k", "prefill tiles, 8192 tokens", [(8192, 8192)], "general",
           prefill_cfgs[:4], "TFLOP/s")
    _sweep(results, "sweep_mixed", "mixed: 64 decodes x 2048 + a 1024-token chunk at 4096 (TFLOP/s)",
           [(1, 2048)] * 64 + [(1024, 4096)], "general",
           [C(bm, 64, nw, 3) for bm, nw in [(64, 4), (32, 4), (16, 2), (128, 8)]], "TFLOP/s")
    t, flops, t_sdpa, _ = prefill_numbers(8192)
    print(f"prefill 8192: {flops / t / 1e12:.0f} TFLOP/s, SDPA {flops / t_sdpa / 1e12:.0f} TFLOP/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="tile sweeps and the split crossover")
    ap.add_argument("--crossover", action="store_true", help="only the split crossover")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev_name = torch.cuda.get_device_name()
    results = {"device": dev_name, "torch": torch.__version__, "triton": triton.__version__,
               "decode_config": str(DECODE_CONFIG), "prefill_config": str(PREFILL_CONFIG)}

    copy_bw = copy_bandwidth()
    rows = []
    reqs = [(1, 1024)] * 256
    t = time_attention(reqs)
    rows.append(("decode 256 x 1024 (" + choose_config(256, KVH, 1, torch.device("cuda"))[0] + ")",
                 t, f"{kv_bytes(reqs) / t / 1e9:.0f} GB/s = {kv_bytes(reqs) / t / copy_bw:.0%} of copy"))
    reqs = [(1, 8192)]
    for path in ("split", "decode"):
        t = time_attention(reqs, path)
        rows.append((f"decode 1 x 8192 ({path})", t,
                     f"{kv_bytes(reqs) / t / 1e9:.0f} GB/s = {kv_bytes(reqs) / t / copy_bw:.0%} of copy"))
    t, flops, t_sdpa, t_write = prefill_numbers(2048)
    rows.append(("prefill 2048 (general)", t, f"{flops / t / 1e12:.0f} TFLOP/s"))
    rows.append(("  torch SDPA, contiguous", t_sdpa, f"{flops / t_sdpa / 1e12:.0f} TFLOP/s"))
    rows.append(("  reshape_and_cache 2048", t_write, ""))
    t, flops, t_sdpa, _ = prefill_numbers(8192)
    rows.append(("prefill 8192 (general)", t, f"{flops / t / 1e12:.0f} TFLOP/s"))
    rows.append(("  torch SDPA, contiguous", t_sdpa, f"{flops / t_sdpa / 1e12:.0f} TFLOP/s"))
    reqs = [(1, 2048)] * 64 + [(1024, 4096)]
    t = time_attention(reqs)
    rows.append(("mixed: 64 x 2048 decode + 1k chunk", t, f"{kv_bytes(reqs) / t / 1e9:.0f} GB/s of KV"))
    results["copy_GBps"] = copy_bw / 1e9
    results["rows"] = [[name, t, note] for name, t, note in rows]

    if args.sweep:
        sweep(results)
    elif args.crossover:
        crossover(results)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_attention.json"), "w") as f:
            json.dump(results, f, indent=1)

    print(f"\n{dev_name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    print(f"{'case':36s} {'median':>10s}  result")
    for name, t, note in rows:
        print(f"{name:36s} {t * 1e6:8.1f}us  {note}")


if __name__ == "__main__":
    main()
