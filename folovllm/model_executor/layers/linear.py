"""Linear layers split over tensor-parallel ranks, with their weights made by a quantization
method.

Megatron's split, as in vLLM: a column-parallel layer keeps 1/tp of the output features on each
rank (q/k/v heads, gate/up rows), a row-parallel layer 1/tp of the input features, and its
partial products are summed over the ranks (all-reduce). Attention and the MLP each need one
all-reduce: QKV and gate_up are column-parallel, o_proj and down_proj row-parallel.

A merged layer (QKV, gate+up) holds several checkpoint matrices stacked along its output, so
one matmul replaces two or three; its weight_loader copies each checkpoint tensor's shard into
that part's slice. Which parameters exist is up to the layer's `quant_method`
(UnquantizedLinearMethod: weight [out, in]); the loaders only read each parameter's layout
attributes (folovllm/model_executor/utils.py), so a quantized layout loads the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from folovllm.distributed.parallel_state import (
    get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce)
from folovllm.model_executor.layers.quantization.base_config import LinearMethodBase, QuantizationConfig
from folovllm.model_executor.utils import check_weight_shape, set_weight_attrs

# Small decode batches on a GPU use the skinny Triton matmul (skinny_gemm.py) for weights with
# at most this many input features. On an H200, inside a CUDA graph, it beat cuBLAS on the attention
# projections at 1-16 rows (o_proj at 1-4 rows: 5.2 vs 12.4 us, where cuBLAS splits K over two
# kernels) and tied on gate/up; on the wide-K down projection (3072) cuBLAS was faster (6.4 vs
# 7.3 us), so it keeps it. benchmarks/bench_skinny_gemm.py measures both.
SKINNY_MAX_K = 2048


def _use_skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.shape[1] <= SKINNY_MAX_K and 0 < x.numel() <= 16 * x.shape[-1])


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator}); "
                         "choose a tensor_parallel_size that divides it")
    return numerator // denominator


def _packed(param: torch.Tensor, dim: int, *sizes: int) -> tuple[int, ...]:
    """Logical sizes/offsets along `dim` in the parameter's own units (divided by the packing
    factor where `dim` is the packed one)."""
    if getattr(param, "packed_dim", None) != dim:
        return sizes
    factor = param.packed_factor
    if any(s % factor for s in sizes):
        raise ValueError(f"sizes {sizes} along the packed dim are not multiples of packed_factor {factor}")
    return tuple(s // factor for s in sizes)


def _load_shard(target: torch.Tensor, loaded: torch.Tensor, dim: int | None, start: int, full: int,
                name: str) -> None:
    """Copy loaded[start:start + target.shape[dim]] along dim (all of it where dim is None)
    into target, after checking the checkpoint tensor has the shape the config implies."""
    if dim is not None:
        expected = list(target.shape)
        expected[dim] = full
        check_weight_shape(loaded, expected, name)
        loaded = loaded.narrow(dim, start, target.shape[dim])
    check_weight_shape(loaded, target.shape, name)
    target.copy_(loaded)


class UnquantizedLinearMethod(LinearMethodBase):
    """A plain weight [out, in]: y = x W^T + b."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        weight = nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
                              requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs})
        layer.register_parameter("weight", weight)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if _use_skinny(x, layer.weight):
            from folovllm.model_executor.layers.skinny_gemm import skinny_gemm
            return skinny_gemm(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)

    def apply_parts(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One matmul per output part, over contiguous row slices of the merged weight."""
        out, start = [], 0
        for size in layer.output_partition_sizes:
            b = None if bias is None else bias[start:start + size]
            out.append(F.linear(x, layer.weight[start:start + size], b))
            start += size
        return out


class LinearBase(nn.Module):
    """What every linear layer shares: its sizes, its rank, and its quant method (asked of
    quant_config by the layer's dotted prefix; unquantized when there is no config or it
    declines the layer)."""

    def __init__(self, input_size: int, output_size: int, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.prefix = prefix
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        self.quant_method: LinearMethodBase = method if method is not None else UnquantizedLinearMethod()

    def _create_params(self, bias: bool, bias_size: int) -> None:
        self.quant_method.create_weights(self, self.input_size_per_partition, self.output_partition_sizes,
                                         self.input_size, self.output_size, self.params_dtype,
                                         weight_loader=self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(bias_size, dtype=self.params_dtype), requires_grad=False)
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.bias = None  # a plain attribute: read on every forward, faster than a None parameter

    def _load_rank_slice(self, param: nn.Parameter, loaded_weight: torch.Tensor, dim: int | None,
                         name: str) -> None:
        """This rank's slice of the checkpoint tensor along `dim` (the whole tensor when None)."""
        size = param.shape[dim] if dim is not None else 0
        _load_shard(param.data, loaded_weight, dim, self.tp_rank * size, size * self.tp_size, name)

    def extra_repr(self) -> str:
        return (f"in={self.input_size_per_partition}, out={self.output_partition_sizes}, "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}, "
                f"method={type(self.quant_method).__name__}")


class ReplicatedLinear(LinearBase):
    """The whole layer on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(input_size, output_size, params_dtype, quant_config, prefix)
        self.input_size_per_partition = input_size
        self.output_partition_sizes = [output_size]
        self._create_params(bias, output_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None,
                      name: str = "") -> None:
        check_weight_shape(loaded_weight, param.shape, name)
        param.data.copy_(loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split over the ranks: rank r holds rows [r*out/tp, (r+1)*out/tp) of W.
    With gather_output the ranks' outputs are concatenated (all-gather); without, each rank
    keeps its slice for the row-parallel layer that follows."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 params_dtype: torch.dtype | None = None, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", output_partition_sizes: list[int] | None = None) -> None:
        super().__init__(input_size, output_size, params_dtype, quant_config, prefix)
        self.input_size_per_partition = input_size
        self.output_size_per_partition = divide(output_size, self.tp_size, f"{prefix or 'layer'} output size")
        self.output_partition_sizes = output_partition_sizes or [self.output_size_per_partition]
        self.gather_output = gather_output and self.tp_size > 1
        self._create_params(bias, self.output_size_per_partition)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None,
                      name: str = "") -> None:
        self._load_rank_slice(param, loaded_weight, getattr(param, "output_dim", None), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        return tensor_model_parallel_all_gather(out) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers with the same input in one (gate_proj + up_proj): each
    rank holds its 1/tp of every part, the parts side by side. Shard ids are the parts' indices."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, gather_output: bool = False,
                 params_dtype: torch.dtype | None = None, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        tp = get_tensor_model_parallel_world_size()
        self.output_sizes = list(output_sizes)
        parts = [divide(s, tp, f"{prefix or 'layer'} output part") for s in self.output_sizes]
        super().__init__(input_size, sum(self.output_sizes), bias, gather_output, params_dtype, quant_config,
                         prefix, output_partition_sizes=parts)

    def shard_spec(self, shard_id) -> tuple[int, int, int, int]:
        """Logical (offset in this rank's param, size, which rank's piece of the checkpoint
        tensor, the checkpoint tensor's full size) of one part along the output dim."""
        i = int(shard_id)
        size = self.output_partition_sizes[i]
        return sum(self.output_partition_sizes[:i]), size, self.tp_rank, self.output_sizes[i]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None,
                      name: str = "") -> None:
        if loaded_shard_id is None:
            raise ValueError(f"checkpoint tensor {name or '?'} would fill every part of the merged layer "
                             f"{self.prefix or '?'} at once; each part loads from its own checkpoint tensor")
        dim = getattr(param, "output_dim", None)
        if dim is None:
            # Not laid out along the output (a g_idx, a per-tensor value): every part carries the same.
            check_weight_shape(loaded_weight, param.shape, name)
            param.data.copy_(loaded_weight)
            return
        offset, size, shard_rank, full = self.shard_spec(loaded_shard_id)
        offset, size, full = _packed(param, dim, offset, size, full)
        _load_shard(param.data.narrow(dim, offset, size), loaded_weight, dim, shard_rank * size, full, name)

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output parts separately. On CPUs, where a decode step is a matrix-vector product
        bound by memory, two narrow GEMMs measured faster than one wide one (MKL, 2 cores)."""
        apply_parts = getattr(self.quant_method, "apply_parts", None)
        if apply_parts is None or self.gather_output:
            return list(self.forward(x).split(self.output_partition_sizes, dim=-1))
        return apply_parts(self, x, self.bias)


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections in one. Query heads are split over the ranks; KV heads too when
    there are at least as many as ranks, otherwise each rank holds one KV head, replicated on
    tp / num_kv_heads ranks (rank r uses KV head r * num_kv_heads // tp). Shard ids: "q", "k",
    "v" (or 0, 1, 2)."""

    _SHARD_INDEX = {"q": 0, "k": 1, "v": 2, 0: 0, 1: 1, 2: 2}

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int | None = None,
                 bias: bool = False, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        tp = get_tensor_model_parallel_world_size()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.num_heads = divide(total_num_heads, tp, f"{prefix or 'attention'}: num_attention_heads")
        if tp >= self.total_num_kv_heads:
            self.num_kv_heads = 1
            if tp % self.total_num_kv_heads:
                raise ValueError(f"{prefix or 'attention'}: the tensor-parallel size ({tp}) is not a multiple "
                                 f"of num_key_value_heads ({self.total_num_kv_heads}), so the KV heads cannot "
                                 "be replicated evenly; choose a tensor_parallel_size that divides or is a "
                                 "multiple of it")
            self.num_kv_head_replicas = tp // self.total_num_kv_heads
        else:
            self.num_kv_heads = divide(self.total_num_kv_heads, tp, f"{prefix or 'attention'}: num_key_value_heads")
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        q_full, kv_full = total_num_heads * head_size, self.total_num_kv_heads * head_size
        # The parent's split, by parts of [q, kv * replicas, kv * replicas] / tp, is this rank's.
        kv_padded = self.kv_size * tp
        super().__init__(hidden_size, [q_full, kv_padded, kv_padded], bias, False, params_dtype, quant_config,
                         prefix)
        self.output_sizes = [q_full, kv_full, kv_full]  # what the checkpoint holds

    def shard_spec(self, shard_id) -> tuple[int, int, int, int]:
        i = self._SHARD_INDEX[shard_id]
        size = self.output_partition_sizes[i]
        shard_rank = self.tp_rank if i == 0 else self.tp_rank // self.num_kv_head_replicas
        return sum(self.output_partition_sizes[:i]), size, shard_rank, self.output_sizes[i]


class RowParallelLinear(LinearBase):
    """Input features split over the ranks: rank r holds columns [r*in/tp, (r+1)*in/tp) of W
    and multiplies its slice of x (the column-parallel output before it); the partial sums are
    all-reduced. The bias is added once, by rank 0, before the sum."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, input_is_parallel: bool = True,
                 reduce_results: bool = True, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(input_size, output_size, params_dtype, quant_config, prefix)
        self.input_size_per_partition = divide(input_size, self.tp_size, f"{prefix or 'layer'} input size")
        self.output_partition_sizes = [output_size]
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self._create_params(bias, output_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None,
                      name: str = "") -> None:
        self._load_rank_slice(param, loaded_weight, getattr(param, "input_dim", None), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        if not self.input_is_parallel:
            x = x.chunk(self.tp_size, dim=-1)[self.tp_rank]
        out = self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        return tensor_model_parallel_all_reduce(out) if self.reduce_results else out
