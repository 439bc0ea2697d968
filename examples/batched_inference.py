"""Continuous batching: many prompts at once, optionally against running them one at a time.

    python examples/batched_inference.py --num-prompts 16 --max-tokens 64 --compare-sequential
"""

import argparse
import time

from folovllm import LLMEngine, ModelConfig, SamplingParams

TOPICS = ["binary search", "a linked list", "quicksort", "a stack", "merge sort", "a queue", "fizzbuzz",
          "the Fibonacci numbers", "a prime sieve", "string reversal", "a hash map", "matrix multiplication",
          "bubble sort", "a binary tree", "depth-first search", "a palindrome check"]

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
parser.add_argument("--num-prompts", type=int, default=16)
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--device", default="auto")
parser.add_argument("--compare-sequential", action="store_true",
                    help="also run the same prompts one at a time and compare tokens/s")
args = parser.parse_args()

prompts = [f"# Python: {TOPICS[i % len(TOPICS)]}\n" for i in range(args.num_prompts)]
params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
engine = LLMEngine(ModelConfig(model=args.model, max_model_len=1024), device=args.device)
engine.generate(prompts[0], SamplingParams(max_tokens=2))  # warm-up


def timed(fn):
    t0 = time.perf_counter()
    outs = fn()
    dt = time.perf_counter() - t0
    return outs, dt, sum(len(o.outputs[0].token_ids) for o in outs)


batched, dt_b, n_b = timed(lambda: list(engine.generate_batch(prompts, params).values()))
print(f"continuous batching: {n_b} tokens in {dt_b:.2f} s = {n_b / dt_b:.1f} tokens/s")
if args.compare_sequential:
    sequential, dt_s, n_s = timed(lambda: [engine.generate(p, params) for p in prompts])
    print(f"one at a time:       {n_s} tokens in {dt_s:.2f} s = {n_s / dt_s:.1f} tokens/s")
    print(f"speed-up: {dt_s / dt_b:.2f}x")
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(batched, sequential))
    print(f"identical greedy outputs: {same}/{len(prompts)}")
print("\nfirst output:\n" + batched[0].outputs[0].text)
