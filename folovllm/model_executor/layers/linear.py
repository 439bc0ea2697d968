"""Linear layers that know how to load checkpoint tensors into themselves.

A merged layer (QKV, or gate+up) holds several checkpoint matrices stacked along its output
dimension, so one matmul replaces two or three. Each checkpoint tensor is loaded into its slice
through `weight_loader`, which checks the shape. This is also the seam where tensor parallelism
(take this rank's slice) and quantization (`quant_method` creates and applies other parameters)
plug in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# Small decode batches on a GPU use the skinny Triton matmul (skinny_gemm.py) for weights with
# at most this many input features. On an H200, inside a CUDA graph, it beat cuBLAS on the attention
# projections at 1-16 rows (o_proj at 1-4 rows: 5.2 vs 12.4 us, where cuBLAS splits K over two
# kernels) and tied on gate/up; on the wide-K down projection (3072) cuBLAS was faster (6.4 vs
# 7.3 us), so it keeps it. benchmarks/bench_skinny_gemm.py measures both.
SKINNY_MAX_K = 2048


def _use_skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.shape[1] <= SKINNY_MAX_K and 0 < x.numel() <= 16 * x.shape[-1])


class UnquantizedLinearMethod:
    """Creates a plain weight (and bias) and applies x W^T + b."""

    def create_weights(self, layer: "Linear", input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        layer.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False) if bias else None

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        if _use_skinny(x, layer.weight):
            from folovllm.model_executor.layers.skinny_gemm import skinny_gemm
            return skinny_gemm(x, layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def apply_parts(self, layer: "Linear", x: torch.Tensor) -> list[torch.Tensor]:
        """One matmul per output part, over contiguous row slices of the merged weight."""
        out, start = [], 0
        for size in layer.output_sizes:
            bias = None if layer.bias is None else layer.bias[start:start + size]
            out.append(F.linear(x, layer.weight[start:start + size], bias))
            start += size
        return out


class Linear(nn.Module):
    """y = x W^T + b, with the output made of `output_sizes` parts (one part for a plain layer)."""

    def __init__(self, input_size: int, output_sizes: int | list[int], bias: bool = False,
                 dtype: torch.dtype | None = None, quant_method=None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, self.output_size, bias,
                                         dtype or torch.get_default_dtype())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output parts separately. On CPUs, where a decode step is a matrix-vector product
        bound by memory, two narrow GEMMs measured faster than one wide one (MKL, 2 cores)."""
        apply_parts = getattr(self.quant_method, "apply_parts", None)
        if apply_parts is None:
            return list(self.forward(x).split(self.output_sizes, dim=-1))
        return apply_parts(self, x)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None,
                      name: str = "") -> None:
        if shard_id is None:
            target = param.data
        else:
            offset = sum(self.output_sizes[:shard_id])
            target = param.data.narrow(0, offset, self.output_sizes[shard_id])
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(f"checkpoint tensor {name or '?'} has shape {tuple(loaded.shape)}, but the "
                             f"model config implies {tuple(target.shape)}: the weights do not match config.json")
        target.copy_(loaded)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_sizes}, bias={self.bias is not None}"
