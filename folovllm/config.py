"""Engine configuration as dataclasses, validated when they are built.

Field names follow vLLM so that a vLLM user can pass the same keywords. `EngineArgs` is the flat
set of keywords that `LLM(...)`, `LLMEngine.from_engine_args` and the command line accept; it
splits them into the typed configs below.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}

LoadFormat = Literal["auto", "safetensors", "gguf", "dummy"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class ModelConfig:
    """What model to run and how to read it.

    `model` is an HF folder (config.json + safetensors), a .gguf file, or the name of a model
    FoloVLLM knows how to fetch (see folovllm.assets). The HF config itself is read later by the
    loader (`hf_config`), so that building a ModelConfig never touches the disk.
    """

    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    trust_remote_code: bool = False
    max_model_len: int | None = None
    seed: int = 0
    load_format: LoadFormat = "auto"
    skip_tokenizer_init: bool = False
    hf_overrides: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and self.model != "",
               "ModelConfig.model must be a non-empty path or model name")
        if isinstance(self.dtype, str):
            _check(self.dtype == "auto" or self.dtype in _DTYPES,
                   f"ModelConfig.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        else:
            _check(self.dtype in _DTYPES.values(),
                   f"ModelConfig.dtype must be float32, float16 or bfloat16, got {self.dtype}")
        _check(self.max_model_len is None or self.max_model_len >= 1,
               f"ModelConfig.max_model_len must be >= 1, got {self.max_model_len}")
        _check(self.load_format in ("auto", "safetensors", "gguf", "dummy"),
               f"ModelConfig.load_format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")

    def resolve_dtype(self, device: torch.device, config_dtype: torch.dtype | None) -> torch.dtype:
        """'auto' is float32 on CPU (bf16 matmuls are several times slower on most CPUs) and the
        checkpoint's dtype on a GPU (bfloat16 when the checkpoint does not say, or says float32)."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        if config_dtype in (torch.float16, torch.bfloat16):
            return config_dtype
        return torch.bfloat16


@dataclass
class CacheConfig:
    """The paged KV cache.

    On a GPU the number of blocks comes from a memory profile: what is left of
    `gpu_memory_utilization` x total memory once weights and activations are in. On a CPU it comes
    from `cpu_kv_cache_space_gib`. `num_gpu_blocks_override` fixes the count on either.
    """

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    cpu_kv_cache_space_gib: float = 4.0
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
               f"CacheConfig.block_size must be a power of two from 1 to 128, got {self.block_size}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"CacheConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
               f"CacheConfig.num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        _check(self.cpu_kv_cache_space_gib > 0,
               f"CacheConfig.cpu_kv_cache_space_gib must be > 0, got {self.cpu_kv_cache_space_gib}")


@dataclass
class SchedulerConfig:
    """Continuous batching limits: at most `max_num_seqs` requests and `max_num_batched_tokens`
    tokens in one step. With chunked prefill a prompt longer than the token budget is computed over
    several steps; without it a prompt must fit the budget whole."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    # Plan step N+1 while step N runs on the device, so the host's scheduling and output
    # processing overlap the GPU. None: on for CUDA devices, off on the CPU (where the forward
    # pass runs on the same cores and there is nothing to overlap).
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        _check(self.max_num_seqs >= 1, f"SchedulerConfig.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
               f"SchedulerConfig.max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")

    def finalize(self, max_model_len: int) -> None:
        """Fill the token budget once max_model_len is known and check the two agree."""
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if self.enable_chunked_prefill else max(8192, max_model_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({max_model_len}) with chunked prefill off, so a long prompt could never be scheduled; "
                "raise max_num_batched_tokens, lower max_model_len, or enable chunked prefill")
        _check(self.max_num_batched_tokens >= self.max_num_seqs or self.enable_chunked_prefill,
               "max_num_batched_tokens must be >= max_num_seqs")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size == 1,
               "tensor_parallel_size > 1 is not supported yet; use tensor_parallel_size=1")


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"
    attention_backend: str = "auto"
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _check(self.attention_backend in ("auto", "torch", "triton"),
               f"attention_backend must be 'auto', 'torch' or 'triton', got {self.attention_backend!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA device is visible; use device='cpu'")
        return dev


@dataclass
class EngineArgs:
    """Every engine keyword by its vLLM name, as `LLM(model=..., **kwargs)` takes them."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_model_len: int | None = None
    seed: int = 0
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    hf_overrides: dict[str, Any] | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    cpu_kv_cache_space_gib: float | None = None
    enable_prefix_caching: bool = False
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1
    device: str = "auto"
    attention_backend: str = "auto"
    enforce_eager: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known ones are {sorted(names)}")
        return cls(**kwargs)

    def create_engine_config(self) -> EngineConfig:
        cpu_space = self.cpu_kv_cache_space_gib
        if cpu_space is None:
            cpu_space = float(os.environ.get("FOLOVLLM_CPU_KVCACHE_SPACE", 4))
        return EngineConfig(
            model_config=ModelConfig(
                model=self.model, tokenizer=self.tokenizer, dtype=self.dtype,
                trust_remote_code=self.trust_remote_code, max_model_len=self.max_model_len,
                seed=self.seed, load_format=self.load_format,  # type: ignore[arg-type]
                skip_tokenizer_init=self.skip_tokenizer_init, hf_overrides=self.hf_overrides),
            cache_config=CacheConfig(
                block_size=self.block_size, gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                cpu_kv_cache_space_gib=cpu_space, enable_prefix_caching=self.enable_prefix_caching),
            scheduler_config=SchedulerConfig(
                max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                enable_chunked_prefill=self.enable_chunked_prefill, async_scheduling=self.async_scheduling),
            parallel_config=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size),
            device=self.device,
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
        )
