"""The shortest path: load a model, generate for a few prompts.

    python examples/basic_usage.py                      # the default Qwen2.5-Coder-0.5B-Instruct GGUF
    python examples/basic_usage.py --model /path/to/hf-folder
"""

import argparse

from folovllm import LLM, SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
args = parser.parse_args()

llm = LLM(model=args.model)
prompts = [
    "def fibonacci(n):",
    "# A function that returns the squares of a list of numbers\ndef",
    "The capital of France is",
]
outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48))
for out in outputs:
    print(f"--- {out.prompt!r}\n{out.outputs[0].text}\n")

# Chat through the model's own chat template.
[reply] = llm.chat([{"role": "user", "content": "Write a one-line Python lambda that doubles a number."}],
                   SamplingParams(temperature=0.0, max_tokens=64))
print("--- chat\n" + reply.outputs[0].text)
