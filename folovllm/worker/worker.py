"""One device (one tensor-parallel rank): load this rank's share of the model, size the KV cache
from memory, and run steps. The worker owns the model runner and its input batch; nothing outside
the worker changes either."""

from __future__ import annotations

import time

import torch

from folovllm.attention.selector import get_attn_backend_cls
from folovllm.config import EngineConfig
from folovllm.core.kv_cache_manager import cdiv
from folovllm.core.kv_cache_utils import check_enough_kv_cache, kv_cache_bytes_per_token
from folovllm.core.sched.output import SchedulerOutput
from folovllm.logger import init_logger
from folovllm.worker.model_runner import ModelRunner, default_graph_batch_sizes

logger = init_logger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: int = 0,
                 distributed_init_method: str | None = None) -> None:
        self.config = config
        self.rank = rank
        self.local_rank = local_rank
        self.distributed_init_method = distributed_init_method
        self.startup_times: dict[str, float] = {}
        self.model_runner: ModelRunner | None = None

    def init_device(self) -> None:
        """Bind this process to its device and join the tensor-parallel group (a no-op at size 1)."""
        from folovllm.distributed import parallel_state

        self.device = self.config.torch_device()
        if self.device.type == "cuda":
            index = self.device.index
            if index is None:  # "cuda" means the current device; graphs need a concrete one
                index = self.local_rank if self.config.parallel_config.world_size > 1 else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        pc = self.config.parallel_config
        parallel_state.init_distributed_environment(
            pc.world_size, self.rank, self.distributed_init_method, self.local_rank,
            backend="nccl" if self.device.type == "cuda" else "gloo")
        parallel_state.initialize_model_parallel(pc.tensor_parallel_size)
        torch.manual_seed(self.config.model_config.seed)

    def load_model(self) -> None:
        from folovllm.model_executor.model_loader import get_model

        mc = self.config.model_config
        t0 = time.perf_counter()
        logger.info("loading weights of %s (%s, %s) on %s", mc.model, mc.hf_config.architectures[0]
                    if getattr(mc.hf_config, "architectures", None) else "?", mc.dtype, self.device)
        attn_impl = get_attn_backend_cls(self.config.attention_backend, self.device)
        model = get_model(mc, attn_impl, self.device)
        self.startup_times["load"] = time.perf_counter() - t0
        logger.info("weights loaded in %.2f s", self.startup_times["load"])
        self.model_runner = ModelRunner(self.config, model, self.device)

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of this rank's parameters: "sharded" (layers split over the tensor-parallel
        ranks: the linears, the embedding and the LM head by vocabulary), "replicated" (norms:
        whole on every rank) and "total"."""
        from folovllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
        from folovllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        sharded = replicated = 0
        seen: set[int] = set()  # a tied LM head is the embedding's parameter: count it once
        for module in self.model_runner.model.modules():
            params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            seen.update(map(id, params))
            own = sum(p.numel() * p.element_size() for p in params)
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
                sharded += own
            else:
                replicated += own
        return {"sharded": sharded, "replicated": replicated, "total": sharded + replicated}

    # ---- KV cache ----------------------------------------------------------------------

    def kv_cache_bytes_per_block(self) -> int:
        """K and V of every attention layer of this rank's model, for one block: read from the
        layers themselves, so a rank that holds 1/N of the KV heads sizes for 1/N of them."""
        layers = self.model_runner.attn_layers
        first = layers[0]
        assert all((l.num_kv_heads, l.head_dim) == (first.num_kv_heads, first.head_dim) for l in layers)
        per_token = kv_cache_bytes_per_token(len(layers), first.num_kv_heads, first.head_dim,
                                             self.config.model_config.dtype)
        return per_token * self.config.cache_config.block_size

    def determine_num_blocks(self) -> int:
        cc, sc = self.config.cache_config, self.config.scheduler_config
        max_model_len = self.config.model_config.max_model_len
        bytes_per_block = self.kv_cache_bytes_per_block()
        if cc.num_gpu_blocks_override is not None:
            num_blocks, knob = cc.num_gpu_blocks_override, "raise num_gpu_blocks_override"
        elif self.device.type == "cpu":
            # No point in more blocks than max_num_seqs full-length requests can use.
            by_space = int(cc.cpu_kv_cache_space_gib * 2**30) // bytes_per_block
            num_blocks = min(by_space, sc.max_num_seqs * cdiv(max_model_len, cc.block_size))
            knob = "raise cpu_kv_cache_space_gib (or FOLOVLLM_CPU_KVCACHE_SPACE)"
        else:
            num_blocks = self._profile_gpu_blocks(bytes_per_block)
            knob = "raise gpu_memory_utilization, free GPU memory"
        check_enough_kv_cache(num_blocks, cc.block_size, max_model_len, knob)
        return num_blocks

    def _profile_gpu_blocks(self, bytes_per_block: int) -> int:
        t0 = time.perf_counter()
        logger.info("profiling memory with a forward pass of %d tokens",
                    self.config.scheduler_config.max_num_batched_tokens)
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
        logger.info("memory profile in %.2f s: total %.2f GiB, peak torch %.2f GiB, other %.2f GiB, "
                    "KV budget %.2f GiB", self.startup_times["profile"], total / 2**30, peak / 2**30,
                    non_torch / 2**30, budget / 2**30)
        return max(int(budget // bytes_per_block), 0)

    def initialize_cache(self, num_blocks: int) -> None:
        t0 = time.perf_counter()
        self.model_runner.initialize_kv_cache(num_blocks)
        self.startup_times["kv_cache"] = time.perf_counter() - t0
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.config.cache_config.block_size,
                    num_blocks * self.kv_cache_bytes_per_block() / 2**30)
        if self.model_runner.use_cuda_graph:
            sizes = default_graph_batch_sizes(self.config.scheduler_config.max_num_seqs)
            logger.info("capturing CUDA graphs for %d batch sizes", len(sizes))
            self.startup_times["cuda_graphs"] = self.model_runner.capture_cuda_graphs(sizes)
            logger.info("CUDA graphs captured in %.2f s", self.startup_times["cuda_graphs"])
        t0 = time.perf_counter()
        if self._warm_up_logits():
            self.startup_times["logits"] = time.perf_counter() - t0
            logger.info("LM head run for 1-%d rows in %.2f s", self.model_runner.max_num_reqs,
                        self.startup_times["logits"])
        t0 = time.perf_counter()
        if self.model_runner.warm_up_sampler():
            self.startup_times["sampler"] = time.perf_counter() - t0
            logger.info("sampler kernels compiled in %.2f s", self.startup_times["sampler"])

    @torch.inference_mode()
    def _warm_up_logits(self) -> bool:
        """Run the LM head over the gathered rows once for every number of rows a step can sample
        (GPU only). It runs outside the CUDA graphs, and cuBLAS picks its kernel by row count:
        the first step with a count never seen (65 rows: 64 decodes and a prompt's last chunk)
        loaded that kernel then, an 18 ms stall in every stream (H200)."""
        runner = self.model_runner
        if runner.device.type != "cuda":
            return False
        hidden = torch.zeros(runner.max_num_reqs, runner.model.config.hidden_size, dtype=runner.dtype,
                             device=runner.device)
        rows = torch.arange(runner.max_num_reqs, device=runner.device)
        for m in range(1, runner.max_num_reqs + 1):
            runner.model.compute_logits(hidden[rows[:m]])
        torch.cuda.synchronize()
        return True

    def get_startup_times(self) -> dict[str, float]:
        return dict(self.startup_times)

    # ---- steps -------------------------------------------------------------------------

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False):
        """The step's ModelRunnerOutput, or with non_block=True a handle whose result() returns it."""
        return self.model_runner.execute_model(scheduler_output, non_block)
