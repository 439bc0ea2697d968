"""Find a model's config, tokenizer and weights, and build the model on a device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from folovllm.config import ModelConfig
    from folovllm.model_executor.layers.quantization.base_config import QuantizationConfig


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
    kernel at real shapes, which is all a benchmark needs. One generator walks the parameters
    in order; a parameter whose quant method knows better (packed integers, group indices)
    carries its own `init_dummy(param, generator, low, high)`, and other integer parameters
    are zeroed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        init = getattr(param, "init_dummy", None)
        if init is not None:
            init(param, gen, low, high)
        elif param.is_floating_point():
            cpu = torch.empty(param.shape, dtype=torch.float32).uniform_(low, high, generator=gen)
            param.data.copy_(cpu)
        else:
            param.data.zero_()


def process_weights_after_loading(model: nn.Module) -> None:
    """Give every layer's quant method its post-load step (repacking, transposing), once all
    weights are in."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def numpy_backed(shape, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor in memory numpy allocated. Measured on the CI machines (2 cores, 2026-11-21):
    a [16, 896] x [896, 151936] float32 matmul took 55-60 ms on numpy's memory and 66-72 ms on
    torch's for the same bytes (numpy asks for transparent huge pages; torch does not)."""
    import numpy as np

    if dtype == torch.bfloat16:
        return torch.from_numpy(np.empty(shape, dtype=np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype))


def get_quant_config(model_config) -> QuantizationConfig | None:
    """The QuantizationConfig of model_config.quantization, parsed from config.json's
    quantization_config (an empty dict when the checkpoint has none), or None."""
    name = getattr(model_config, "quantization", None)
    if not name:
        return None
    from folovllm.model_executor.layers.quantization import get_quantization_config_cls

    quant_config = get_quantization_config_cls(name).from_config(getattr(model_config, "hf_quant_config", None) or {})
    dtype = model_config.dtype
    supported = quant_config.get_supported_act_dtypes()
    if dtype not in supported:
        raise ValueError(f"quantization {name!r} runs with dtype {[str(d).removeprefix('torch.') for d in supported]}, "
                         f"not {str(dtype).removeprefix('torch.')}; pass one of those as dtype")
    return quant_config


def skip_stray_biases(model: nn.Module, weights):
    """Drop all-zero `.bias` tensors of layers built without a bias: some GPTQ exporters write
    one for every linear. A non-zero one still reaches the model, whose loader refuses it."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    mapping = getattr(model, "stacked_params_mapping", [])
    for name, tensor in weights:
        if name.endswith(".bias"):
            target = next((name.replace(f".{part}.", f".{merged}.") for merged, part, _ in mapping
                           if f".{part}." in name), name)
            if target not in params and not torch.count_nonzero(tensor):
                continue
        yield name, tensor


def get_model(model_config: ModelConfig, attn_impl, device: torch.device) -> nn.Module:
    """Build the model of `model_config` (a resolved ModelConfig: model, hf_config, dtype,
    quantization, hf_quant_config, seed, load_format) on `device`, this tensor-parallel rank's
    shard of it (folovllm.distributed.parallel_state), with its weights loaded (or dummies) and
    every quant method's process_weights_after_loading done."""
    from folovllm.model_executor.models.registry import get_model_cls

    hf_config = model_config.hf_config
    quant_config = get_quant_config(model_config)
    model_cls = get_model_cls(hf_config)
    with torch.device(device):
        model = model_cls(hf_config, attn_impl, model_config.dtype, quant_config=quant_config, prefix="")
    if device.type == "cpu":
        for param in model.parameters():  # a tied weight is one Parameter: moved once
            if param.numel() * param.element_size() >= 2**21:
                # Assigning .data keeps the Parameter object, so its layout attributes too.
                param.data = numpy_backed(tuple(param.shape), param.dtype)
    if load_format_of(model_config) == "dummy":
        initialize_dummy_weights(model, model_config.seed)
    else:
        loaded = model.load_weights(skip_stray_biases(model, iterate_weights(model_config)))
        missing = model.expected_weight_names() - loaded
        if missing:
            raise ValueError(f"the checkpoint at {model_config.model} lacks {len(missing)} weight(s), e.g. "
                             f"{sorted(missing)[:5]}; the files are incomplete or belong to another model")
    process_weights_after_loading(model)
    return model.eval()
