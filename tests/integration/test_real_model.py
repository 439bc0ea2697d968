"""The real Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M), fetched once into the cache folder:
FoloVLLM's greedy tokens with float32 weights (quantization="none"; a GGUF file on CPU otherwise
gets int8 weights) equal transformers' on the same file."""

from __future__ import annotations

import os

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm.assets import fetch_default_model

pytestmark = pytest.mark.slow

PROMPTS = [
    "def merge_sort(arr):",
    "# Read a CSV file with pandas and print the mean of each column\nimport",
    "The three most common HTTP methods are",
]


@pytest.fixture(scope="module")
def gguf_path():
    return str(fetch_default_model())


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(gguf_path, max_model_len=1024, quantization="none")


def test_greedy_matches_transformers(gguf_path, llm):
    from transformers import AutoModelForCausalLM

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                              dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.get_tokenizer()(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.inference_mode():
            ref = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref, prompt
        assert out.outputs[0].text == llm.get_tokenizer().decode(ref, skip_special_tokens=True)


def test_chat_answers_and_stops_at_end_of_turn(llm):
    [out] = llm.chat([{"role": "user", "content": "What is 2 + 2? Reply with the number only."}],
                     SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text.strip() == "4"


def test_cli_generate_streams_text(gguf_path, capsys):
    from folovllm.entrypoints.cli import main

    assert main(["generate", "--model", gguf_path, "--prompt", "def add(a, b):", "--max-tokens", "24",
                 "--max-model-len", "256"]) == 0
    printed = capsys.readouterr().out
    assert "return a + b" in printed
