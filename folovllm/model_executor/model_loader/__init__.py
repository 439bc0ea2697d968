"""Find a model's config, tokenizer and weights, and build the model on a device."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from folovllm.logger import init_logger

logger = init_logger(__name__)

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


def iterate_weights(model_config: ModelConfig, skip: frozenset[str] = frozenset()):
    """(name, tensor) of every checkpoint weight; a GGUF file does not read the names in `skip`."""
    fmt = load_format_of(model_config)
    if fmt == "gguf":
        from folovllm.model_executor.model_loader.gguf_loader import iterate_gguf_weights
        dtype = model_config.dtype if model_config.dtype in (torch.float16, torch.bfloat16) else torch.float32
        return iterate_gguf_weights(model_config.model, dtype, skip)
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@contextlib.contextmanager
def returning_freed_memory(device: torch.device):
    """While a CPU model loads, buffers of 1 MiB and more are mapped and unmapped on their own,
    so the float tensors freed as each layer is loaded (and, with int8/int4, quantized) go back to
    the OS at once. By default glibc raises that threshold after the first large free and keeps
    later freed tensors in its heap: measured on the real GGUF model with int8, 1.53 GB resident
    after loading instead of 1.03 GB. Afterwards the threshold is 32 MiB, where glibc's own
    adjustment ends, and the heap is trimmed. A no-op off glibc (or off CPU)."""
    libc = None
    if device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc has both)
        except (OSError, AttributeError):
            libc = None
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
            libc.malloc_trim(0)


def get_quant_config(model_config) -> QuantizationConfig | None:
    """The QuantizationConfig of model_config.quantization, parsed from config.json's
    quantization_config (an empty dict when the checkpoint has none), or None."""
    name = getattr(model_config, "quantization", None)
    if not name:
        return None
    from folovllm.model_executor.layers.quantization import get_quantization_config_cls

    quant_config = get_quantization_config_cls(name).from_config(getattr(model_config, "hf_quant_config", None) or {})
    kernel_dtype = getattr(model_config, "cpu_kernel_dtype", None)
    if kernel_dtype is not None and hasattr(quant_config, "kernel_dtype"):
        quant_config.kernel_dtype = kernel_dtype
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
        del tensor  # not held while the next one is read


EMBEDDING_WEIGHT = "model.embed_tokens.weight"


def embedding_from_file(model: nn.Module, model_config: ModelConfig, device: torch.device) -> str | None:
    """The embedding table's name when the model looks its rows up in the GGUF file instead of
    holding the table (gguf_loader.GGUFEmbeddingRows; same values): a GGUF model on CPU, on one
    rank, whose LM head does not read the table (untied, or a quantized copy of its own). Else None."""
    inner = getattr(model, "model", None)
    if (load_format_of(model_config) != "gguf" or device.type != "cpu" or not hasattr(inner, "embedding_rows")
            or getattr(inner.embed_tokens, "tp_size", 1) != 1):
        return None
    head = getattr(model, "lm_head", None)
    if head is None or head.weight is inner.embed_tokens.weight:  # tied: the head is built from it
        return None
    return EMBEDDING_WEIGHT


def get_model(model_config: ModelConfig, attn_impl, device: torch.device) -> nn.Module:
    """Build the model of `model_config` (a resolved ModelConfig: model, hf_config, dtype,
    quantization, hf_quant_config, seed, load_format) on `device`, this tensor-parallel rank's
    shard of it (folovllm.distributed.parallel_state), with its weights loaded (or dummies) and
    every quant method's process_weights_after_loading done."""
    from folovllm.model_executor.models.registry import get_model_cls

    hf_config = model_config.hf_config
    quant_config = get_quant_config(model_config)
    model_cls = get_model_cls(hf_config)
    with returning_freed_memory(device):
        with torch.device(device):
            model = model_cls(hf_config, attn_impl, model_config.dtype, quant_config=quant_config, prefix="")
        if device.type == "cpu":
            for param in model.parameters():  # a tied weight is one Parameter: moved once
                if param.numel() * param.element_size() >= 2**21:
                    # Assigning .data keeps the Parameter object, so its layout attributes too.
                    param.data = numpy_backed(tuple(param.shape), param.dtype)
        rows_of = embedding_from_file(model, model_config, device)
        if load_format_of(model_config) == "dummy":
            initialize_dummy_weights(model, model_config.seed)
        else:
            skip = frozenset([rows_of]) if rows_of else frozenset()
            loaded = model.load_weights(skip_stray_biases(model, iterate_weights(model_config, skip))) | skip
            missing = model.expected_weight_names() - loaded
            if missing:
                raise ValueError(f"the checkpoint at {model_config.model} lacks {len(missing)} weight(s), e.g. "
                                 f"{sorted(missing)[:5]}; the files are incomplete or belong to another model")
        process_weights_after_loading(model)
        if rows_of:
            from folovllm.model_executor.model_loader.gguf_loader import GGUFEmbeddingRows
            embed = model.model.embed_tokens
            model.model.embedding_rows = GGUFEmbeddingRows(model_config.model, rows_of, embed.weight.dtype)
            embed.weight.data = torch.empty(0, dtype=embed.weight.dtype)
    if device.type == "cpu" and model_config.quantization in ("int8", "int4", "gptq") \
            and model_config.dtype != torch.bfloat16 and getattr(model_config, "cpu_kernel_dtype", None) is None:
        logger.warning("%s weights with %s activations run PyTorch's slow CPU path (the int8/int4 kernels are "
                       "fast with bfloat16 only); pass dtype='bfloat16' for speed", model_config.quantization,
                       str(model_config.dtype).removeprefix("torch."))
    sizes = weight_bytes(model)
    logger.info("weights: %s; %s in memory, %s read per decode step", weight_format(model_config),
                _bytes(sizes["total"]), _bytes(sizes["per_token"]))
    return model.eval()


def _bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def weight_format(model_config: ModelConfig) -> str:
    """The weights as they run, in words: the quantization method (and why it was chosen) and
    the activations' dtype."""
    dtype = str(model_config.dtype).removeprefix("torch.")
    name = model_config.quantization
    if name is None:
        return f"{dtype} (unquantized)"
    why = ""
    if getattr(model_config, "_asked_quantization", None) is None and \
            getattr(model_config, "_checkpoint_quantization", None) is None:
        why = " (the default for a GGUF file on CPU; quantization='none' keeps float32 weights)"
    if name == "int4":
        from folovllm.model_executor.layers.quantization.int4 import Int4Config
        group = Int4Config.from_config(getattr(model_config, "hf_quant_config", None) or {}).group_size
        kind = f"int4 weights, groups of {group} inputs (smaller where {group} does not divide a layer's)"
    else:
        kind = {"int8": "int8 weights, one scale per output row"}.get(name, f"{name} weights")
    kernel = getattr(model_config, "cpu_kernel_dtype", None)
    if kernel is not None:  # ModelConfig.resolve_dtype: a CPU without bfloat16 instructions
        return f"{kind}{why}, {dtype} activations ({str(kernel).removeprefix('torch.')} into the kernels)"
    return f"{kind}{why}, {dtype} activations"


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights as they sit in memory ("total": parameters and buffers,
    shared ones once) and of what one decode step reads ("per_token"): all of them except the
    embedding table, of which a step reads only its rows (unless an unquantized LM head is tied
    to it), and the rotary tables."""
    from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding
    from folovllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    seen: set[int] = set()
    total = per_token = 0
    read_by_head = {id(m.weight) for m in model.modules()
                    if isinstance(m, ParallelLMHead) and m.quant_method is None}
    for module in model.modules():
        skipped = isinstance(module, RotaryEmbedding) or (
            isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead))
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            size = t.numel() * t.element_size()
            total += size
            if not skipped or id(t) in read_by_head:
                per_token += size
    return {"total": total, "per_token": per_token}
