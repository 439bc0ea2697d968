"""The engine API: configs, one request, and the step loop underneath it.

    python examples/single_inference.py --prompt "def is_prime(n):"
"""

import argparse

from folovllm import CacheConfig, LLMEngine, ModelConfig, SamplingParams, SchedulerConfig

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
parser.add_argument("--prompt", default="def is_prime(n):")
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--device", default="auto")
args = parser.parse_args()

engine = LLMEngine(
    ModelConfig(model=args.model, max_model_len=2048),
    scheduler_config=SchedulerConfig(max_num_seqs=8),
    cache_config=CacheConfig(block_size=16),
    device=args.device,
)
params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

# One call...
out = engine.generate(args.prompt, params)
print(out.outputs[0].text)
print(f"[{len(out.outputs[0].token_ids)} tokens, finish_reason={out.outputs[0].finish_reason}, "
      f"TTFT {out.metrics.time_to_first_token * 1000:.0f} ms]")

# ...is this loop: queue a request, then step the engine until it finishes, reading partial
# outputs as they come (iter_outputs calls engine.step() and yields this request's outputs).
req_id = engine.add_request("streamed", args.prompt, params)
printed = 0
for o in engine.iter_outputs([req_id]):
    text = o.outputs[0].text
    print(text[printed:], end="", flush=True)
    printed = len(text)
print()
