"""Engine configuration as dataclasses, validated and resolved when they are built.

Field names follow vLLM so that a vLLM user can pass the same keywords. Building a `ModelConfig`
resolves the model's facts once (the local path, the HF config, max_model_len, the quantization
method); building an `EngineConfig` resolves what depends on the device (dtype, the token budget,
async scheduling). Every constructor downstream takes these configs, never loose copies of their
fields. `EngineArgs` (folovllm/engine/arg_utils.py) is derived from the fields below.
"""

from __future__ import annotations

import copy
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
# Methods that quantize a float checkpoint after loading, for PyTorch's CPU kernels.
CPU_QUANTIZATIONS = ("int8", "int4")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bfloat16 arithmetic instructions (x86 AVX512_BF16 or AMX-BF16), as far
    as /proc/cpuinfo says; True where it cannot be read (other systems keep bfloat16)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return True


DEFAULT_CPU_KV_CACHE_GIB = 4.0


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), which a container or taskset may
    make fewer than the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _help(text: str) -> dict:
    """Field metadata: the command line's help for the flag of this field."""
    return {"help": text}


@dataclass
class ModelConfig:
    """What model to run and how to read it.

    `model` is an HF folder (config.json + safetensors), a .gguf file, a hub id, or the name of a
    model FoloVLLM knows how to fetch (see folovllm.assets). Construction resolves it to a local
    path and reads the HF config; the results are `hf_config`, `max_model_len` (an int),
    `quantization` (the method name or None) and `hf_quant_config`. `dtype` becomes a torch.dtype
    once the device is known (EngineConfig)."""

    model: str = field(metadata=_help("HF folder, .gguf file, hub id, or a known model name"))
    tokenizer: str | None = field(default=None, metadata=_help("tokenizer folder (default: the model's)"))
    dtype: str | torch.dtype = field(default="auto", metadata=_help(
        "auto (float32 on CPU, the checkpoint's on GPU), float32, float16 or bfloat16"))
    trust_remote_code: bool = False
    max_model_len: int | None = field(default=None, metadata=_help(
        "longest prompt + output (default: the model's max_position_embeddings)"))
    seed: int = field(default=0, metadata=_help("seeds the engine (dummy weights, unseeded sampling)"))
    load_format: LoadFormat = field(default="auto", metadata=_help("auto, safetensors, gguf or dummy"))
    skip_tokenizer_init: bool = False
    hf_overrides: dict[str, Any] | None = None
    quantization: str | None = field(default=None, metadata=_help(
        "int8 or int4 (weights kept quantized, for CPUs), none (float weights), or the checkpoint's method "
        "(default: the checkpoint's quantization_config; a GGUF file on CPU: int8)"))

    # Resolved in __post_init__.
    hf_config: Any = field(init=False, repr=False, default=None)
    hf_quant_config: dict | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and self.model != "",
               "ModelConfig.model must be a non-empty path or model name")
        if isinstance(self.dtype, str):
            _check(self.dtype == "auto" or self.dtype in _DTYPES,
                   f"ModelConfig.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        else:
            _check(self.dtype in _DTYPES.values(),
                   f"ModelConfig.dtype must be float32, float16 or bfloat16, got {self.dtype}")
        _check(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 1),
               f"ModelConfig.max_model_len must be an int >= 1, got {self.max_model_len!r}")
        _check(self.load_format in ("auto", "safetensors", "gguf", "dummy"),
               f"ModelConfig.load_format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")
        from folovllm.assets import resolve_model
        from folovllm.model_executor.model_loader import load_hf_config

        _check(self.quantization is None or (isinstance(self.quantization, str) and self.quantization != ""),
               f"ModelConfig.quantization must be a method name such as 'int8', 'int4' or 'none', got "
               f"{self.quantization!r}")
        self._asked_dtype = self.dtype  # dtype is resolved per device (EngineConfig), from this
        self._asked_quantization = self.quantization  # so is a GGUF file's default quantization

        self.model = resolve_model(self.model)
        if self.tokenizer is not None:
            self.tokenizer = resolve_model(self.tokenizer)
        self.hf_config = load_hf_config(self)
        self.max_model_len = self._resolve_max_model_len()
        self._resolve_quantization()

    def _resolve_max_model_len(self) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None)
        if self.max_model_len is None:
            if limit is None:
                raise ValueError("the model config has no max_position_embeddings; pass max_model_len")
            return limit
        if limit is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len ({self.max_model_len}) is larger than the model's "
                             f"max_position_embeddings ({limit}); lower max_model_len")
        return self.max_model_len

    def _resolve_quantization(self) -> None:
        """The method named by config.json's quantization_config, or by the user; an unknown
        method, or a user choice that contradicts the checkpoint, is a clear error."""
        hf_quant = getattr(self.hf_config, "quantization_config", None)
        if hf_quant is not None and not isinstance(hf_quant, dict):
            hf_quant = hf_quant.to_dict() if hasattr(hf_quant, "to_dict") else dict(vars(hf_quant))
        checkpoint_method = hf_quant.get("quant_method") if hf_quant else None
        self._checkpoint_quantization = checkpoint_method
        if self.quantization is not None and self.quantization.lower() == "none":
            if checkpoint_method is not None:
                raise ValueError(f"quantization='none' was asked for, but the checkpoint at {self.model} holds "
                                 f"{checkpoint_method!r}-quantized weights, which cannot run as float ones; leave "
                                 "quantization unset to use the checkpoint's method")
            self.quantization = None
            return
        if self.quantization is not None and checkpoint_method is not None \
                and self.quantization.lower() != str(checkpoint_method).lower():
            raise ValueError(f"quantization={self.quantization!r} was asked for, but the checkpoint at "
                             f"{self.model} is quantized with {checkpoint_method!r}; leave quantization "
                             "unset to use the checkpoint's method")
        method = self.quantization or checkpoint_method
        if method is None:
            return
        from folovllm.model_executor.layers.quantization import get_quantization_config_cls
        # Raises for an unknown method, and for settings the method cannot run (GPTQ bits=3, say).
        get_quantization_config_cls(str(method).lower()).from_config(hf_quant or {})
        self.quantization = str(method).lower()
        self.hf_quant_config = hf_quant

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    def resolve_quantization(self, device: torch.device) -> str | None:
        """What was asked, or the checkpoint's method; with neither, a GGUF file on CPU gets int8
        (its 4-8-bit weights would otherwise become float32, four bytes a weight read per token).
        `quantization="none"` keeps float weights."""
        asked = getattr(self, "_asked_quantization", self.quantization)
        if asked is None and getattr(self, "_checkpoint_quantization", None) is None:
            from folovllm.model_executor.model_loader import load_format_of
            gguf_on_cpu = device.type == "cpu" and load_format_of(self) == "gguf"
            self.quantization = "int8" if gguf_on_cpu else None
            if gguf_on_cpu:
                self.hf_quant_config = None
        return self.quantization

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        """'auto' is float32 on CPU (bf16 matmuls are several times slower on most CPUs), except
        with int8/int4 weights, whose CPU kernels are fast only with bfloat16 inputs: bfloat16
        throughout, but for int8 on a CPU without bfloat16 instructions (cpu_has_native_bf16),
        where it is float32 with the int8 kernel fed bfloat16 rows (`cpu_kernel_dtype`). On a
        2-core Xeon without AVX512_BF16 that took the real model's 128-token TTFT from 2.0 to 0.97 s
        and its 16-prompt batch from 25 to 42 tok/s at the same decode speed; int4 so run lost
        12-22% of its batch-1 decode (for 1.9x its batch), so it stays bfloat16 (docs/cpu.md). On
        a GPU it is the checkpoint's dtype (bfloat16 when the checkpoint does not say, or says
        float32)."""
        self.cpu_kernel_dtype = None
        asked = getattr(self, "_asked_dtype", self.dtype)
        if isinstance(asked, torch.dtype):
            return asked
        if asked != "auto":
            return _DTYPES[asked]
        if device.type == "cpu":
            if self.quantization not in CPU_QUANTIZATIONS:
                return torch.float32
            if self.quantization == "int4" or cpu_has_native_bf16():
                return torch.bfloat16
            self.cpu_kernel_dtype = torch.bfloat16
            return torch.float32
        from folovllm.model_executor.model_loader import config_dtype
        checkpoint = config_dtype(self.hf_config)
        if checkpoint in (torch.float16, torch.bfloat16):
            return checkpoint
        return torch.bfloat16


@dataclass
class CacheConfig:
    """The paged KV cache.

    On a GPU the number of blocks comes from a memory profile: what is left of
    `gpu_memory_utilization` x total memory once weights and activations are in. On a CPU it comes
    from `cpu_kv_cache_space_gib` (default: $FOLOVLLM_CPU_KVCACHE_SPACE, else 4).
    `num_gpu_blocks_override` fixes the count on either. The engine records the count it chose in
    `num_gpu_blocks`."""

    block_size: int = field(default=16, metadata=_help("tokens per KV-cache block"))
    gpu_memory_utilization: float = field(default=0.9, metadata=_help(
        "share of GPU memory for weights, activations and the KV cache"))
    num_gpu_blocks_override: int | None = field(default=None, metadata=_help("fix the number of KV blocks"))
    cpu_kv_cache_space_gib: float | None = field(default=None, metadata=_help(
        f"KV-cache size on CPU, GiB (default: $FOLOVLLM_CPU_KVCACHE_SPACE or {DEFAULT_CPU_KV_CACHE_GIB:g})"))
    enable_prefix_caching: bool = field(default=True, metadata=_help(
        "reuse the KV blocks of earlier requests that start with the same tokens"))

    num_gpu_blocks: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
               f"CacheConfig.block_size must be a power of two from 1 to 128, got {self.block_size}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"CacheConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
               f"CacheConfig.num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        if self.cpu_kv_cache_space_gib is None:
            env = os.environ.get("FOLOVLLM_CPU_KVCACHE_SPACE")
            try:
                self.cpu_kv_cache_space_gib = float(env) if env else DEFAULT_CPU_KV_CACHE_GIB
            except ValueError:
                raise ValueError(f"FOLOVLLM_CPU_KVCACHE_SPACE must be a number of GiB, got {env!r}") from None
        _check(0 < self.cpu_kv_cache_space_gib < float("inf"),
               f"CacheConfig.cpu_kv_cache_space_gib (or FOLOVLLM_CPU_KVCACHE_SPACE) must be a finite number "
               f"of GiB > 0, got {self.cpu_kv_cache_space_gib}")


@dataclass
class SchedulerConfig:
    """Continuous batching limits: at most `max_num_seqs` requests and `max_num_batched_tokens`
    tokens in one step. With chunked prefill a prompt longer than the token budget is computed over
    several steps; without it a prompt must fit the budget whole."""

    max_num_seqs: int = field(default=256, metadata=_help("most requests in one step"))
    max_num_batched_tokens: int | None = field(default=None, metadata=_help(
        "token budget of one step (default: 8192, or max_model_len without chunked prefill)"))
    enable_chunked_prefill: bool = True
    # vLLM's knob: with chunked prefill, one request's prompt takes at most this many tokens of a
    # step, so a long prompt leaves room for others (0: no cap beyond the budget).
    long_prefill_token_threshold: int = field(default=0, metadata=_help(
        "most prompt tokens one request may take in one step with chunked prefill (0: no cap)"))
    # Plan step N+1 while step N runs on the device, so the host's scheduling and output
    # processing overlap the GPU. None: on for CUDA devices, off on the CPU (where the forward
    # pass runs on the same cores and there is nothing to overlap).
    async_scheduling: bool | None = field(default=None, metadata=_help(
        "plan the next step while the device runs this one (default: on CUDA, off on CPU)"))

    # Set by finalize() from the model config.
    max_model_len: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        _check(self.max_num_seqs >= 1, f"SchedulerConfig.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
               f"SchedulerConfig.max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _check(isinstance(self.long_prefill_token_threshold, int) and self.long_prefill_token_threshold >= 0,
               f"SchedulerConfig.long_prefill_token_threshold must be an int >= 0, got "
               f"{self.long_prefill_token_threshold!r}")
        _check(self.long_prefill_token_threshold == 0 or self.enable_chunked_prefill,
               "SchedulerConfig.long_prefill_token_threshold needs chunked prefill: it splits prompts over steps; "
               "enable chunked prefill or leave the threshold at 0")
        # What was asked, kept apart from what finalize() resolves, so a config can be resolved
        # again (for another model or device) from the same request.
        self._asked_batched_tokens = self.max_num_batched_tokens
        self._asked_async = self.async_scheduling

    def finalize(self, max_model_len: int, device_type: str = "cpu") -> None:
        """Fill the token budget and async scheduling once the model and device are known, and
        check the budget and max_model_len agree."""
        self.max_model_len = max_model_len
        budget = self._asked_batched_tokens
        if budget is None:
            budget = 8192 if self.enable_chunked_prefill else max(8192, max_model_len)
        if not self.enable_chunked_prefill and budget < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({budget}) is smaller than max_model_len "
                f"({max_model_len}) with chunked prefill off, so a long prompt could never be scheduled; "
                "raise max_num_batched_tokens, lower max_model_len, or enable chunked prefill")
        _check(budget >= self.max_num_seqs or self.enable_chunked_prefill,
               "max_num_batched_tokens must be >= max_num_seqs")
        self.max_num_batched_tokens = budget
        self.async_scheduling = device_type == "cuda" if self._asked_async is None else self._asked_async


@dataclass
class ParallelConfig:
    """How the model is spread over devices. The engine process holds the scheduler; each of
    `tensor_parallel_size` workers holds 1/N of every layer (folovllm/distributed)."""

    tensor_parallel_size: int = field(default=1, metadata=_help("number of GPUs (workers) a model is split over"))

    def __post_init__(self) -> None:
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
               f"ParallelConfig.tensor_parallel_size must be an int >= 1, got {self.tensor_parallel_size!r}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size


@dataclass
class EngineConfig:
    """Every config of one engine, resolved together: construction fixes the device, the model's
    quantization and dtype on it, the scheduler's token budget and async scheduling, and (on CPU)
    torch's thread count."""

    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N"))
    attention_backend: str = field(default="auto", metadata=_help("auto, torch (reference) or triton (GPU)"))
    enforce_eager: bool = field(default=False, metadata=_help("no CUDA graphs"))
    num_threads: int | None = field(default=None, metadata=_help(
        "CPU threads for the model's matmuls (default: the cores this process may run on)"))

    def __post_init__(self) -> None:
        _check(isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda")
                                                 or self.device.startswith("cuda:")),
               f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _check(self.attention_backend in ("auto", "torch", "triton"),
               f"attention_backend must be 'auto', 'torch' or 'triton', got {self.attention_backend!r}")
        _check(self.num_threads is None or (isinstance(self.num_threads, int) and not isinstance(self.num_threads, bool)
                                            and self.num_threads >= 1),
               f"num_threads must be an int >= 1 (or unset for the available cores), got {self.num_threads!r}")
        self._torch_device = self._resolve_device()
        # Each engine resolves its own copies: a config the caller reuses (for another device, or
        # through dataclasses.replace) is resolved again from what was asked, not from the result.
        self.model_config = copy.copy(self.model_config)
        self.cache_config = copy.copy(self.cache_config)
        self.scheduler_config = copy.copy(self.scheduler_config)
        self.parallel_config = copy.copy(self.parallel_config)
        self.model_config.resolve_quantization(self._torch_device)
        self.model_config.dtype = self.model_config.resolve_dtype(self._torch_device)
        self.scheduler_config.finalize(self.model_config.max_model_len, self._torch_device.type)
        self.num_threads = self.num_threads or available_cores()
        self.set_threads()

    def set_threads(self) -> None:
        """torch's intra-op threads on a CPU engine. Its own default counts the machine's cores,
        not those the process may use (a cgroup or taskset leaves fewer), and more threads than
        cores slow every matmul down."""
        if self._torch_device.type == "cpu":
            torch.set_num_threads(self.num_threads)

    def __setstate__(self, state: dict) -> None:
        # An engine core started in a process of its own (spawn) gets its threads set there too.
        self.__dict__.update(state)
        self.set_threads()

    def _resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA device is visible; use device='cpu'")
        return dev

    def torch_device(self) -> torch.device:
        return self._torch_device
