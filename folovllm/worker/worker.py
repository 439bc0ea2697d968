"""One device: load the model, size the KV cache from memory, and run steps."""

from __future__ import annotations

import logging
import time

import torch

from folovllm.attention.backends.abstract import get_attn_backend_cls
from folovllm.config import EngineConfig
from folovllm.core.kv_cache_manager import cdiv
from folovllm.core.kv_cache_utils import check_enough_kv_cache, kv_cache_bytes_per_token
from folovllm.core.sched.output import SchedulerOutput
from folovllm.model_executor.model_loader import config_dtype, get_model
from folovllm.worker.model_runner import ModelRunner, default_graph_batch_sizes

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, hf_config, max_model_len: int) -> None:
        self.config = config
        self.hf_config = hf_config
        self.max_model_len = max_model_len
        self.device = config.torch_device()
        self.dtype = config.model_config.resolve_dtype(self.device, config_dtype(hf_config))
        self.startup_times: dict[str, float] = {}
        if self.device.type == "cuda":
            if self.device.index is None:  # "cuda" means the current device; graphs need a concrete one
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.model_config.seed)

        t0 = time.perf_counter()
        attn_impl = get_attn_backend_cls(config.attention_backend, self.device)
        model = get_model(config.model_config, hf_config, attn_impl, self.device, self.dtype)
        self.startup_times["load"] = time.perf_counter() - t0
        sc = config.scheduler_config
        self.model_runner = ModelRunner(
            model, self.device, config.cache_config.block_size, hf_config.vocab_size,
            max_num_reqs=sc.max_num_seqs, max_model_len=max_model_len,
            max_num_tokens=max(sc.max_num_batched_tokens, sc.max_num_seqs),
            use_cuda_graph=not config.enforce_eager)

    def num_kv_heads_and_head_dim(self) -> tuple[int, int]:
        c = self.hf_config
        heads = c.num_attention_heads
        return (getattr(c, "num_key_value_heads", None) or heads,
                getattr(c, "head_dim", None) or c.hidden_size // heads)

    def determine_num_blocks(self) -> int:
        cc, sc = self.config.cache_config, self.config.scheduler_config
        kvh, hd = self.num_kv_heads_and_head_dim()
        bytes_per_block = kv_cache_bytes_per_token(self.hf_config.num_hidden_layers, kvh, hd, self.dtype) \
            * cc.block_size
        if cc.num_gpu_blocks_override is not None:
            num_blocks, knob = cc.num_gpu_blocks_override, "raise num_gpu_blocks_override"
        elif self.device.type == "cpu":
            # No point in more blocks than max_num_seqs full-length requests can use.
            by_space = int(cc.cpu_kv_cache_space_gib * 2**30) // bytes_per_block
            num_blocks = min(by_space, sc.max_num_seqs * cdiv(self.max_model_len, cc.block_size))
            knob = "raise cpu_kv_cache_space_gib (or FOLOVLLM_CPU_KVCACHE_SPACE)"
        else:
            num_blocks = self._profile_gpu_blocks(bytes_per_block)
            knob = "raise gpu_memory_utilization, free GPU memory"
        check_enough_kv_cache(num_blocks, cc.block_size, self.max_model_len, knob)
        return num_blocks

    def _profile_gpu_blocks(self, bytes_per_block: int) -> int:
        t0 = time.perf_counter()
        sc = self.config.scheduler_config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.model_runner.profile_run(sc.max_num_batched_tokens, min(sc.max_num_seqs, sc.max_num_batched_tokens))
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated()
        non_torch = total - free - torch.cuda.memory_reserved()
        budget = total * self.config.cache_config.gpu_memory_utilization - peak - non_torch
        self.startup_times["profile"] = time.perf_counter() - t0
        logger.info("memory profile: total %.2f GiB, peak torch %.2f GiB, other %.2f GiB, KV budget %.2f GiB",
                    total / 2**30, peak / 2**30, non_torch / 2**30, budget / 2**30)
        return max(int(budget // bytes_per_block), 0)

    def initialize_cache(self, num_blocks: int) -> None:
        t0 = time.perf_counter()
        self.model_runner.initialize_kv_cache(num_blocks, self.dtype)
        self.startup_times["kv_cache"] = time.perf_counter() - t0
        if self.model_runner.use_cuda_graph:
            sizes = default_graph_batch_sizes(self.config.scheduler_config.max_num_seqs)
            self.startup_times["cuda_graphs"] = self.model_runner.capture_cuda_graphs(sizes)
        t0 = time.perf_counter()
        if self.model_runner.warm_up_sampler():
            self.startup_times["sampler"] = time.perf_counter() - t0

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False):
        """The step's ModelRunnerOutput, or with non_block=True a handle whose get() returns it."""
        return self.model_runner.execute_model(scheduler_output, non_block)
