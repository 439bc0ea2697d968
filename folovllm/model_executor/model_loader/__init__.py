"""Find a model's config, tokenizer and weights, and build the model on a device."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from folovllm.config import ModelConfig


def load_format_of(model_config: ModelConfig) -> str:
    fmt = model_config.load_format
    if fmt != "auto":
        return fmt
    return "gguf" if model_config.model.endswith(".gguf") else "safetensors"


def load_hf_config(model_config: ModelConfig):
    """The transformers config of the model (from config.json, or from the GGUF file's metadata)."""
    from transformers import AutoConfig

    path = model_config.model
    if not os.path.exists(path):
        raise ValueError(f"model {path!r} does not exist: pass an HF model folder (config.json + "
                         "*.safetensors) or a .gguf file")
    if load_format_of(model_config) == "gguf" or path.endswith(".gguf"):
        from folovllm.model_executor.model_loader.gguf_loader import load_gguf_config
        config = load_gguf_config(path)
    else:
        if not (Path(path) / "config.json").exists():
            raise ValueError(f"{path} has no config.json; a model folder needs config.json and safetensors weights")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=model_config.trust_remote_code)
        except ValueError as e:
            raise ValueError(f"cannot read {path}/config.json: {e}") from e
    for key, value in (model_config.hf_overrides or {}).items():
        setattr(config, key, value)
    return config


def config_dtype(hf_config) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def iterate_weights(model_config: ModelConfig):
    fmt = load_format_of(model_config)
    if fmt == "gguf":
        from folovllm.model_executor.model_loader.gguf_loader import iterate_gguf_weights
        return iterate_gguf_weights(model_config.model)
    from folovllm.model_executor.model_loader.safetensors_loader import iterate_safetensors_weights
    return iterate_safetensors_weights(model_config.model)


def initialize_dummy_weights(model: nn.Module, seed: int, low: float = -1e-3, high: float = 1e-3) -> None:
    """Small uniform random weights (norm weights stay 1), seeded: enough to exercise every
    kernel at real shapes, which is all a benchmark needs."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        cpu = torch.empty(param.shape, dtype=torch.float32).uniform_(low, high, generator=gen)
        param.data.copy_(cpu)


def numpy_backed(shape, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor in memory numpy allocated. Measured on the CI machines (2 cores, 2026-11-21):
    a [16, 896] x [896, 151936] float32 matmul took 55-60 ms on numpy's memory and 66-72 ms on
    torch's for the same bytes (numpy asks for transparent huge pages; torch does not)."""
    import numpy as np

    if dtype == torch.bfloat16:
        return torch.from_numpy(np.empty(shape, dtype=np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype))


def get_model(model_config: ModelConfig, hf_config, attn_impl, device: torch.device,
              dtype: torch.dtype) -> nn.Module:
    from folovllm.model_executor.models.registry import get_model_cls

    model_cls = get_model_cls(hf_config)
    with torch.device(device):
        model = model_cls(hf_config, attn_impl, dtype)
    if device.type == "cpu":
        for param in model.parameters():  # a tied weight is one Parameter: moved once
            if param.numel() * param.element_size() >= 2**21:
                param.data = numpy_backed(tuple(param.shape), param.dtype)
    if load_format_of(model_config) == "dummy":
        initialize_dummy_weights(model, model_config.seed)
    else:
        loaded = model.load_weights(iterate_weights(model_config))
        missing = model.expected_weight_names() - loaded
        if missing:
            raise ValueError(f"the checkpoint at {model_config.model} lacks {len(missing)} weight(s), e.g. "
                             f"{sorted(missing)[:5]}; the files are incomplete or belong to another model")
    return model.eval()
