"""Bad input gets a ValueError that names the problem, and other requests carry on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from folovllm import LLM, LLMEngine, ModelConfig, SamplingParams, SchedulerConfig


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["qwen3"][0], max_model_len=64)


GOOD = {"prompt_token_ids": [5, 6, 7, 8]}


@pytest.mark.parametrize("prompt, match", [
    ({"prompt_token_ids": list(range(3, 70))}, "67 tokens, but max_model_len is 64"),
    ({"prompt_token_ids": []}, "prompt is empty"),
    ({"prompt_token_ids": [5, 9999]}, "token id 9999 is outside the model's vocabulary"),
    ("some text", "without a tokenizer"),
    (3.5, "must be text, a list of token ids or a dict"),
])
def test_bad_prompt_is_rejected_and_others_finish(llm, prompt, match):
    engine = llm.llm_engine
    good_id = engine.add_request(None, GOOD, SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()  # the good request is running when the bad one arrives
    with pytest.raises(ValueError, match=match):
        engine.add_request(None, prompt, SamplingParams(max_tokens=5))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == good_id and out.finished:
                final = out
    assert final is not None and len(final.outputs[0].token_ids) == 5


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 2.0}, r"min_p must be in \[0, 1\]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"min_tokens": 9, "max_tokens": 3}, "min_tokens must be <= max_tokens"),
    ({"logprobs": 50}, "logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_one_bad_prompt_in_a_batch_rejects_the_call_but_engine_keeps_working(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([GOOD, {"prompt_token_ids": []}], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    [out] = llm.generate([GOOD], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3


def test_missing_model_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_folder_without_weights(tiny_models, tmp_path):
    shutil.copy(f"{tiny_models['llama'][0]}/config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        LLM(str(tmp_path))


def test_wrong_shaped_tensor_names_it(tiny_models, tmp_path):
    src = tiny_models["llama"][0]
    shutil.copy(f"{src}/config.json", tmp_path / "config.json")
    weights = load_file(f"{src}/model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"  # 2 KV heads x head_dim 16 = 32 rows
    weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{name} has shape \(33, 64\), but the model config implies \(32, 64\)"):
        LLM(str(tmp_path))


def test_missing_tensor_is_reported(tiny_models, tmp_path):
    src = tiny_models["llama"][0]
    shutil.copy(f"{src}/config.json", tmp_path / "config.json")
    weights = load_file(f"{src}/model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 weight.*model.norm.weight"):
        LLM(str(tmp_path))


def test_corrupt_safetensors(tiny_models, tmp_path):
    shutil.copy(f"{tiny_models['llama'][0]}/config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        LLM(str(tmp_path))


def test_unknown_architecture(tiny_models, tmp_path):
    src = tiny_models["llama"][0]
    config = json.loads(open(f"{src}/config.json").read())
    config["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(f"{src}/model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="MambaForCausalLM.*not supported"):
        LLM(str(tmp_path))


def test_too_little_kv_cache_names_the_knob(tiny_models):
    with pytest.raises(ValueError, match="fewer than max_model_len.*num_gpu_blocks_override"):
        LLM(tiny_models["qwen3"][0], max_model_len=256, block_size=16, num_gpu_blocks_override=4)


def test_unknown_engine_keyword(tiny_models):
    with pytest.raises(TypeError, match="unknown engine argument.*max_num_sequences"):
        LLM(tiny_models["qwen3"][0], max_num_sequences=3)


def test_chunked_prefill_off_needs_budget_for_max_model_len(tiny_models):
    with pytest.raises(ValueError, match="max_num_batched_tokens \\(32\\) is smaller than max_model_len"):
        LLMEngine(ModelConfig(tiny_models["qwen3"][0], max_model_len=128),
                  scheduler_config=SchedulerConfig(max_num_batched_tokens=32, enable_chunked_prefill=False))
