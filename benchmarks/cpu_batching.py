"""CPU: one request at a time vs continuous batching vs transformers' batched generate, on the real
model (Qwen2.5-Coder-0.5B-Instruct GGUF, dequantized to float32), the same 16 prompts, 64 new
tokens each, greedy, EOS ignored so every system produces the same number of tokens.

    python benchmarks/cpu_batching.py [--num-prompts 16] [--max-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from folovllm import LLM, SamplingParams
from folovllm.assets import fetch_default_model

TOPICS = ["binary search", "a linked list", "quicksort", "a stack", "merge sort", "a queue", "fizzbuzz",
          "the Fibonacci numbers", "a prime sieve", "string reversal", "a hash map", "matrix multiplication",
          "bubble sort", "a binary tree", "depth-first search", "a palindrome check"]


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = str(fetch_default_model())
    prompts = [f"# Python: {TOPICS[i % len(TOPICS)]}\n" for i in range(args.num_prompts)]
    n = args.max_tokens
    total = n * len(prompts)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    from transformers import AutoModelForCausalLM
    llm = LLM(path, max_model_len=1024)
    tok = llm.get_tokenizer()
    tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)

    def hf_run(new_tokens):
        with torch.inference_mode():
            return hf.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=tok.pad_token_id)

    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-ups
    hf_run(2)
    # Interleaved, so that drift in the machine's speed hits both systems alike.
    t_batched, t_hf = [], []
    for _ in range(args.repeats):
        batched, t = best_of(lambda: llm.generate(prompts, params, use_tqdm=False), 1)
        t_batched.append(t)
        hf_out, t = best_of(lambda: hf_run(n), 1)
        t_hf.append(t)
    t_batched, t_hf = statistics.median(t_batched), statistics.median(t_hf)
    seq, t_seq = best_of(lambda: [llm.generate([p], params, use_tqdm=False)[0] for p in prompts], 1)
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(batched, seq))
    hf_tokens = hf_out[:, enc.input_ids.shape[1]:]
    hf_same = sum(b.outputs[0].token_ids == hf_tokens[i].tolist() for i, b in enumerate(batched))

    print(f"\nCPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {len(prompts)} prompts x {n} new tokens, float32")
    print(f"{'system':<42}{'wall s':>8}{'tokens/s':>10}  (median of {args.repeats} interleaved runs; sequential: 1 run)")
    for name, t in [("FoloVLLM, one request at a time", t_seq), ("FoloVLLM, continuous batching", t_batched),
                    ("transformers generate, padded batch", t_hf)]:
        print(f"{name:<42}{t:>8.2f}{total / t:>10.1f}")
    print(f"batched == sequential tokens: {same}/{len(prompts)}; batched == transformers: {hf_same}/{len(prompts)}")


if __name__ == "__main__":
    main()
