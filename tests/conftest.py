"""Shared fixtures: tiny random Hugging Face models saved to a temporary folder."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: let torch use both, and keep tokenizers from spawning more.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kwargs = dict(TINY)
    if arch == "qwen3":
        cls = Qwen3Config
        kwargs.update(head_dim=32, tie_word_embeddings=True)
    elif arch == "qwen2":
        cls = Qwen2Config
        kwargs.update(tie_word_embeddings=False)
    elif arch == "llama":
        cls = LlamaConfig
        kwargs.update(tie_word_embeddings=False)
    else:
        raise ValueError(arch)
    kwargs.update(overrides)
    return cls(**kwargs)


def build_tiny_model(path, arch: str, seed: int = 0, **overrides):
    """A random model of the given architecture saved as config.json + model.safetensors."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (folder, HF reference model), built once per test session."""
    out = {}
    for arch in ("qwen3", "qwen2", "llama"):
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (str(path), build_tiny_model(path, arch))
    return out
