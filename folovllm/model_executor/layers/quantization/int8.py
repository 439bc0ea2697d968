"""`quantization="int8"`: weights kept as int8 with one scale per output channel, quantized once
after loading from whatever the checkpoint holds (a float safetensors model, or a GGUF file's
weights as dequantized by the loader).

On CPU the matmul is PyTorch's own int8-weight kernel (`aten._weight_int8pack_mm`), which reads
the int8 weights directly: a decode step reads a quarter of float32's bytes. That kernel is fast
only with bfloat16 activations (measured, 2 cores, 896 x 4864 GEMV at batch 1: 152 us with
bfloat16 activations, 1,371 us with float32, 368 us for a dense float32 matmul), so run the model
with dtype="bfloat16". Elsewhere (a GPU) the weight is dequantized per call: correct, not fast.

Symmetric round-to-nearest per output row: scale = max |w| / 127, q = round(w / scale) in
[-127, 127], w ~ q * scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from folovllm.model_executor.layers.quantization.base_config import LinearMethodBase, QuantizationConfig


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], float32 scales [N]) with weight ~ q * scales[:, None]."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Config(QuantizationConfig):
    # The LM head is the largest matmul of a small model's decode step (Qwen2.5-0.5B: 136 M of its
    # 494 M parameters), so a tied head gets an int8 copy too; the embedding lookup stays as it is.
    quantizes_tied_lm_head = True

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
            return Int8LinearMethod()
        return None


class Int8LinearMethod(LinearMethodBase):
    def create_weights(self, *args, **kwargs) -> None:
        # Loaded in the model's dtype exactly as an unquantized weight; quantized once all are in.
        from folovllm.model_executor.layers.linear import UnquantizedLinearMethod
        UnquantizedLinearMethod.create_weights(self, *args, **kwargs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        dtype = layer.weight.dtype
        q, scales = quantize_int8_rows(layer.weight.data)
        layer.register_buffer("weight_int8", q, persistent=False)
        layer.register_buffer("weight_scale", scales.to(dtype), persistent=False)
        # The float weight is freed; an empty one of the same dtype stays for code that asks it.
        layer.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=q.device), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), layer.weight_int8,
                                                   layer.weight_scale.to(x2.dtype))
        else:
            y = x2 @ (layer.weight_int8.to(x2.dtype) * layer.weight_scale.to(x2.dtype)[:, None]).t()
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])
