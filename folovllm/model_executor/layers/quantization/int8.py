"""`quantization="int8"`: weights kept as int8 with one scale per output channel, quantized once
after loading from whatever the checkpoint holds (a float safetensors model, or a GGUF file's
weights as dequantized by the loader), each layer as soon as its weights are in.

On CPU the matmul is PyTorch's own int8-weight kernel (`aten._weight_int8pack_mm`), which reads
the int8 weights directly: a decode step reads a quarter of float32's bytes. That kernel is fast
only with bfloat16 activations (measured, 2 cores, 896 x 4864 GEMV at batch 1: 152 us with
bfloat16 activations, 1,371 us with float32, 368 us for a dense float32 matmul), so dtype "auto" is
bfloat16 with this method on CPU, or, on a CPU without bfloat16 instructions, float32 with the
kernel's rows cast to bfloat16 (kernel_dtype; ModelConfig.resolve_dtype). Its time grows with every
row, so from DENSE_FROM_ROWS rows on (a prefill) the layer is dequantized for that call and
multiplied densely, and a vocabulary-wide layer (the LM head) already from CHUNKED_FROM_ROWS rows
(a batch's decode step), a cache-sized chunk at a time (dense_by_chunks). Elsewhere (a GPU) the
weight is dequantized per call: correct, not fast.

Symmetric round-to-nearest per output row: scale = max |w| / 127, q = round(w / scale) in
[-127, 127], w ~ q * scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from folovllm.model_executor.layers.quantization.base_config import LinearMethodBase, QuantizationConfig


# From this many rows (a prefill) on, dequantizing the weight and a dense matmul beat the int8
# kernel, whose time grows with every row. Measured, 2 cores, 4864 x 896: dequantizing to bfloat16
# 0.58 ms; kernel / dense bfloat16 0.70 / 0.43 ms at 16 rows, 2.61 / 1.04 at 64, 47 / 17 at 1,600.
# With float32 activations the kernel took 1.7 ms at 1 row and 37 ms at 16, dequantizing 0.71 ms.
DENSE_FROM_ROWS = {torch.bfloat16: 32}  # other dtypes: 2

# A layer as wide as a vocabulary (the LM head: Qwen2.5-0.5B's 151,936 outputs) from a few rows on
# (a batch's decode step): its weight dequantized CHUNK_ROWS output rows at a time, each chunk in
# cache while a dense matmul reads it, beat the int8 kernel. Measured, 2 cores, 896 x 151,936,
# kernel / chunks of 4096 rows: 23.1 / 22.1 ms at 6 rows, 26.4 / 20.6 at 8, 40.6 / 22.7 at 12,
# 55.2 / 29.2 at 16 (at 1 and 4 rows the kernel: 9.2 / 16.2, 12.8 / 17.1). At 9,728 outputs the
# kernel stayed faster at 16 rows (1.90 against 2.4-3.0 ms).
CHUNKED_FROM_ROWS = 8
CHUNKED_MIN_OUTPUTS = 65536
CHUNK_ROWS = 4096

# Rows quantized at a time: the float32 temporaries of a whole LM head (Qwen2.5-0.5B: 136 M
# weights) would add ~1.6 GB to the peak memory of loading.
CHUNK_ELEMENTS = 1 << 20


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], float32 scales [N]) with weight ~ q * scales[:, None]."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=torch.float32, device=weight.device)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for i in range(0, n, step):
        w = weight[i:i + step].float()
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[i:i + step] = torch.round(w / s[:, None]).clamp(-127, 127)
        scales[i:i + step] = s
    return q, scales


def dense_by_chunks(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale[:, None])^T in x's dtype: the integers converted CHUNK_ROWS output rows at a
    time into one reused buffer and multiplied densely, the scales applied to the product (one
    multiply per output, not per weight: at 8-16 rows of the LM head 20.6-29.2 ms, against
    31.1-57.5 ms with the scales folded into each chunk, the same error)."""
    n, k = q.shape
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    buf = torch.empty(min(CHUNK_ROWS, n), k, dtype=x.dtype, device=x.device)
    for start in range(0, n, CHUNK_ROWS):
        w = buf[:min(CHUNK_ROWS, n - start)]
        w.copy_(q[start:start + len(w)])
        torch.mm(x, w.t(), out=out[:, start:start + len(w)])
    return out.mul_(scale)


class Int8Config(QuantizationConfig):
    # The LM head is the largest matmul of a small model's decode step (Qwen2.5-0.5B: 136 M of its
    # 494 M parameters), so a tied head gets an int8 copy too; the embedding lookup stays as it is.
    quantizes_tied_lm_head = True
    # The dtype float32 activations meet the CPU kernel in (ModelConfig.cpu_kernel_dtype): None
    # keeps them float32 (exact, slow); bfloat16 rounds only the kernel's input, the model's other
    # operations staying float32.
    kernel_dtype: torch.dtype | None = None

    @classmethod
    def get_name(cls) -> str:
        return "int8"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Int8Config":
        return cls()

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        from folovllm.model_executor.layers.linear import LinearBase
        from folovllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        # The decoder's linears and the LM head (tied or not).
        if isinstance(layer, (LinearBase, ParallelLMHead)):
            return Int8LinearMethod(self.kernel_dtype)
        return None


class QuantizeOnLoadMethod(LinearMethodBase):
    """A method that loads a float weight exactly as an unquantized layer does and quantizes it
    (`quantize(layer)`) as soon as all of the layer's parts are in, so loading holds at most a
    layer or two in float at a time, not the whole model; the float weight's memory is released
    then. A layer that no loader filled whole (a tied LM head, dummy weights) is quantized by
    process_weights_after_loading, after everything is in."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        from folovllm.model_executor.layers.linear import UnquantizedLinearMethod

        load = extra_weight_attrs.get("weight_loader")
        layer.owns_float_weight = True  # a tied LM head shares the embedding's instead
        if load is not None:
            num_parts = len(output_partition_sizes)

            def weight_loader(param, loaded_weight, loaded_shard_id=None, name: str = "") -> None:
                if getattr(layer, "quantized", False):
                    where = getattr(layer, "prefix", "") or "a layer"
                    raise ValueError(f"checkpoint tensor {name or '?'} is loaded into {where} a second time; a "
                                     "checkpoint holds each weight once")
                if (loaded_shard_id is None and num_parts == 1 and getattr(layer, "tp_size", 1) == 1
                        and param is layer.weight and loaded_weight.shape == param.shape
                        and loaded_weight.dtype == param.dtype and loaded_weight.is_contiguous()):
                    # The loader would copy the tensor whole: quantize from it, not from a copy (an
                    # LM head is 0.27 GB in bfloat16 on Qwen2.5-0.5B; the copy topped loading's peak).
                    param.data = loaded_weight
                else:
                    load(param, loaded_weight, loaded_shard_id, name)
                parts = layer.__dict__.setdefault("_loaded_parts", set())
                parts.add(getattr(layer, "_SHARD_INDEX", {}).get(loaded_shard_id, loaded_shard_id))  # "q" is 0
                if loaded_shard_id is None or len(parts) == num_parts:
                    self.process_weights_after_loading(layer)

            extra_weight_attrs = {**extra_weight_attrs, "weight_loader": weight_loader}
        UnquantizedLinearMethod.create_weights(self, layer, input_size_per_partition, output_partition_sizes,
                                               input_size, output_size, params_dtype, **extra_weight_attrs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if getattr(layer, "quantized", False):
            return
        layer.__dict__.pop("_loaded_parts", None)
        self.quantize(layer)
        layer.quantized = True
        empty = torch.empty(0, dtype=layer.weight.dtype, device=layer.weight.device)
        if getattr(layer, "owns_float_weight", False):
            # The float weight's memory goes; the Parameter object stays (empty, same dtype, same
            # loader), since the model's loader may hold it until loading ends.
            layer.weight.data = empty
        else:  # a tied LM head: the embedding keeps the table, the head gets an empty weight of its own
            layer.weight = nn.Parameter(empty, requires_grad=False)

    def quantize(self, layer: nn.Module) -> None:
        """Register the quantized buffers from layer.weight [N, K]."""
        raise NotImplementedError


class Int8LinearMethod(QuantizeOnLoadMethod):
    def __init__(self, kernel_dtype: torch.dtype | None = None) -> None:
        self.kernel_dtype = kernel_dtype  # see Int8Config.kernel_dtype

    def quantize(self, layer: nn.Module) -> None:
        dtype = layer.weight.dtype
        q, scales = quantize_int8_rows(layer.weight.data)
        layer.register_buffer("weight_int8", q, persistent=False)
        layer.register_buffer("weight_scale", scales.to(dtype), persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        kd = self.kernel_dtype if self.kernel_dtype is not None and x2.dtype == torch.float32 else x2.dtype
        if x2.device.type == "cpu" and x2.shape[0] < DENSE_FROM_ROWS.get(kd, 2):
            xk, scale = x2.to(kd).contiguous(), layer.weight_scale.to(kd)
            if x2.shape[0] >= CHUNKED_FROM_ROWS and layer.weight_int8.shape[0] >= CHUNKED_MIN_OUTPUTS:
                y = dense_by_chunks(xk, layer.weight_int8, scale).to(x2.dtype)
            else:
                y = torch.ops.aten._weight_int8pack_mm(xk, layer.weight_int8, scale).to(x2.dtype)
        else:  # one dequantized copy of the weight at a time, not two (a prefill's peak memory)
            y = x2 @ layer.weight_int8.to(x2.dtype).mul_(layer.weight_scale.to(x2.dtype)[:, None]).t()
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])
