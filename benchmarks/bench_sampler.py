"""Sampling cost per engine step on a GPU: the PyTorch path of Sampler against the fused Triton path.

bf16 logits of shape [batch, 151936] (the Qwen vocabulary), every row at temperature 0.6 with no
other parameter, batches 1, 32, 128 and 256. Three timings per batch:

  torch   Sampler(fused=False).forward: cast to float32, divide, softmax, exponential race, argmax
  fused   Sampler(fused=True).forward: host-drawn Philox keys copied to the GPU, then the two
          Triton launches of triton_sampler.gumbel_sample
  kernel  gumbel_sample alone, on keys already on the GPU

Each figure is the median over --repeats calls of the time between two CUDA events recorded
around one call (after --warmup calls), so it includes the host time of launching the call when
the GPU would otherwise wait for it. The logits are not flushed from L2 between calls: in a real
step they were just written by the LM head. "GB/s" is the kernel's logits bytes over its time.

  python benchmarks/bench_sampler.py
  python benchmarks/bench_sampler.py --batches 1 256 --repeats 500
"""

from __future__ import annotations

import argparse
import statistics

import torch

from folovllm.sample.metadata import build_sampling_metadata
from folovllm.sample.sampler import _GREEDY_EPS, Sampler
from folovllm.sampling_params import SamplingParams

VOCAB = 151936
TEMPERATURE = 0.6


def median_us(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def bench(batch: int, warmup: int, repeats: int) -> dict:
    from folovllm.sample.triton_sampler import gumbel_sample

    device = torch.device("cuda")
    logits = (torch.randn(batch, VOCAB, device=device) * 3).to(torch.bfloat16)
    params = [SamplingParams(temperature=TEMPERATURE)] * batch
    md = build_sampling_metadata(params, [0] * batch, {}, VOCAB, device)
    torch_sampler, fused_sampler = Sampler(fused=False), Sampler(fused=True)
    assert fused_sampler.takes_fused_path(logits, md) and not torch_sampler.takes_fused_path(logits, md)
    keys = fused_sampler.row_keys(batch, device)
    row = {"batch": batch}
    row["torch"] = median_us(lambda: torch_sampler(logits, md), warmup, repeats)
    row["fused"] = median_us(lambda: fused_sampler(logits, md), warmup, repeats)
    row["kernel"] = median_us(lambda: gumbel_sample(logits, md.temperature, keys, _GREEDY_EPS),
                              warmup, repeats)
    row["gbps"] = logits.numel() * logits.element_size() / (row["kernel"] * 1e-6) / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128, 256])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampler.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, vocabulary {VOCAB}, bf16 logits, "
          f"temperature {TEMPERATURE}; median of {args.repeats} calls (CUDA events)")
    rows = [bench(b, args.warmup, args.repeats) for b in args.batches]
    print()
    print(f"{'batch':>6} {'torch us':>10} {'fused us':>10} {'kernel us':>10} {'speed-up':>9} {'kernel GB/s':>12}")
    for r in rows:
        print(f"{r['batch']:>6} {r['torch']:>10.1f} {r['fused']:>10.1f} {r['kernel']:>10.1f} "
              f"{r['torch'] / r['fused']:>8.1f}x {r['gbps']:>12.0f}")


if __name__ == "__main__":
    main()
