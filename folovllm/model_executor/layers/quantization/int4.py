"""`quantization="int4"`: weights kept as 4-bit codes in groups along the input, one scale and one
zero per group and output row, quantized once after loading from whatever the checkpoint holds (a
float safetensors model, or a GGUF file's weights as dequantized by the loader), each layer as soon
as its weights are in.

Asymmetric round-to-nearest per group of G input features (G = 128, or the largest of 64 / 32 that
divides the input size): with lo, hi the group's extremes,

    scale = (hi - lo) / 15,  zero = lo + 8 * scale,  q = round((w - zero) / scale) + 8 in [0, 15],
    w ~ (q - 8) * scale + zero

which is the convention of PyTorch's CPU int4 kernel, `aten._weight_int4pack_mm_for_cpu(x, packed,
G, scales_and_zeros)`: scales_and_zeros is [K / G, N, 2] in the activations' dtype (scale, zero),
and `packed` comes from `aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K], 1)`, uint8
[N, K / 2] in the kernel's blocked layout: for each block of 64 output rows, byte [k, j] holds row
j's code in its low nibble and row 32 + j's in its high one. The kernel takes G in {32, 64, 128,
256}, K a multiple of G and N a multiple of 16; rows are padded here to a multiple of 64 (zero
scales and zeros, sliced off the output) and inputs to a multiple of 32.

Like the int8 kernel it is fast only with bfloat16 activations (measured, 2 cores, 4864 x 896 at
batch 1: 89-122 us in bfloat16, 4,100 us in float32, 232 us for a dense bfloat16 matmul), so
dtype "auto" is bfloat16 with this method on CPU. Its time grows with every row: from
DENSE_FROM_ROWS rows on (a prefill; with float32 activations, 3 rows) the weight is dequantized for
the call and multiplied densely. Elsewhere (a GPU) the codes are kept two per byte in plain order
and the weight is dequantized per call: correct, not fast.

GPTQ checkpoints of 4 bits run on the same kernel on CPU (gptq.py packs their codes with
`pack_int4_cpu`), since GPTQ's scales[g] * (q - z[g]) is (q - 8) * scale + (8 - z) * scale.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from folovllm.model_executor.layers.quantization.base_config import LinearMethodBase, QuantizationConfig
from folovllm.model_executor.layers.quantization.int8 import QuantizeOnLoadMethod

GROUP_SIZES = (128, 64, 32)  # the choice for a layer: the largest that divides its input size
KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # what the CPU kernel accepts
BLOCK_N = 64  # output rows per block of the CPU kernel's packed layout
# The kernel's time grows with every row; from this many rows on, dequantizing the weight for the
# call and a dense matmul are cheaper. Measured, 2 cores, 4864 x 896: kernel / dense bfloat16 matmul
# 5.3 / 1.75 ms at 128 rows, 52 / 17 at 1,600, dequantizing 3.5-4.7 ms; the real model's 128-token
# prefill took 0.45 s on the kernel, 1.0 s dequantized. With float32 activations the kernel took
# ~4 ms a row, dequantizing 6-13 ms.
DENSE_FROM_ROWS = {torch.bfloat16: 256}  # other dtypes: 3
CHUNK_ELEMENTS = 1 << 20


def pick_group_size(input_size: int, largest: int = GROUP_SIZES[0]) -> int:
    """The group of a layer with `input_size` inputs (already a multiple of 32): the largest of
    128/64/32, up to `largest`, that divides it."""
    for g in GROUP_SIZES:
        if g <= largest and input_size % g == 0:
            return g
    raise ValueError(f"int4 needs an input size that is a multiple of 32, got {input_size}")


def quantize_int4_groups(weight: torch.Tensor, group_size: int,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, K] in [0, 15], scales [K / G, N], zeros [K / G, N]) with weight ~
    (codes - 8) * scale + zero per group. Scale and zero are rounded to `dtype` first and the codes
    rounded against those, so the stored numbers are the best grid for what is kept."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input size {k}")
    codes = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, k // group_size, dtype=dtype, device=weight.device)
    zeros = torch.empty_like(scales)
    step = max(1, CHUNK_ELEMENTS // k)  # rows at a time: float32 temporaries of a whole LM head are GBs
    for i in range(0, n, step):
        w = weight[i:i + step].float().reshape(-1, k // group_size, group_size)
        lo, hi = w.amin(dim=2), w.amax(dim=2)
        scale = ((hi - lo) / 15).to(dtype)
        zero = (lo + 8 * scale.float()).to(dtype)
        s, z = scale.float().unsqueeze(2), zero.float().unsqueeze(2)
        # A constant group has scale 0: every code is 8, and the weight is its zero.
        q = torch.where(s > 0, torch.round((w - z) / torch.where(s > 0, s, 1.0)) + 8, 8.0).clamp(0, 15)
        codes[i:i + step] = q.reshape(-1, k)
        scales[i:i + step], zeros[i:i + step] = scale, zero
    return codes, scales.t().contiguous(), zeros.t().contiguous()


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, padded_n: int) -> torch.Tensor:
    """[G, N] scales and zeros -> the kernel's [G, padded_n, 2], padded rows all zero."""
    g, n = scales.shape
    out = torch.zeros(g, padded_n, 2, dtype=scales.dtype, device=scales.device)
    out[:, :n, 0] = scales
    out[:, :n, 1] = zeros
    return out


def _pad_to(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def pack_int4_cpu(codes: torch.Tensor) -> torch.Tensor:
    """int [N, K] codes (N a multiple of 64, K of 32) -> the CPU kernel's packed uint8 [N, K / 2].
    Blocks of 64 rows pack on their own, so rows go a chunk at a time (the kernel's packer wants
    int32 codes: 4 bytes a weight for a whole LM head otherwise)."""
    n, k = codes.shape
    out = torch.empty(n, k // 2, dtype=torch.uint8, device=codes.device)
    step = max(BLOCK_N, CHUNK_ELEMENTS // k // BLOCK_N * BLOCK_N)
    for i in range(0, n, step):
        out[i:i + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes[i:i + step].to(torch.int32).contiguous(), 1)
    return out


def unpack_int4_cpu(packed: torch.Tensor) -> torch.Tensor:
    """The codes back from the CPU kernel's layout (see the module docstring): uint8 [N, K / 2] ->
    uint8 [N, K]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(n // BLOCK_N, k, BLOCK_N // 2)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=2)  # [N / 64, K, 64]: rows j and 32 + j
    return codes.permute(0, 2, 1).reshape(n, k)


_CPU_LAYOUT_OK: bool | None = None


def cpu_layout_known() -> bool:
    """Whether this PyTorch build packs as unpack_int4_cpu reads (checked once on a small random
    matrix): only then can a CPU weight be dequantized for the dense path."""
    global _CPU_LAYOUT_OK
    if _CPU_LAYOUT_OK is None:
        codes = torch.randint(0, 16, (2 * BLOCK_N, 64), generator=torch.Generator().manual_seed(0),
                              dtype=torch.int32)
        _CPU_LAYOUT_OK = torch.equal(unpack_int4_cpu(pack_int4_cpu(codes)).to(torch.int32), codes)
    return _CPU_LAYOUT_OK


def pack_int4_plain(codes: torch.Tensor) -> torch.Tensor:
    """int [N, K] codes -> uint8 [N, K / 2]: byte j holds code 2j (low nibble) and 2j + 1 (high)."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4_plain(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=2).reshape(packed.shape[0], -1)


def dequantize_int4(codes: torch.Tensor, sz: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] = (codes - 8) * scale + zero, from codes [N, K] and scales_and_zeros [G, N, 2]."""
    n, k = codes.shape
    s = sz[:, :n, 0].t().to(dtype).unsqueeze(2)
    z = sz[:, :n, 1].t().to(dtype).unsqueeze(2)
    w = (codes.view(n, k // group_size, group_size).to(dtype) - 8) * s + z
    return w.view(n, k)


def uses_cpu_kernel(device: torch.device) -> bool:
    """Whether a weight on `device` is kept in the CPU kernel's layout (else: plain, dequantized
    per call)."""
    return device.type == "cpu"


def int4_cpu_linear(x2: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor,
                    out_features: int) -> torch.Tensor:
    """x2 [M, K_padded] @ W^T -> [M, out_features] for a weight in the CPU kernel's layout: the
    kernel for few rows, the dequantized weight and a dense matmul for many (DENSE_FROM_ROWS)."""
    if x2.shape[0] >= DENSE_FROM_ROWS.get(x2.dtype, 3) and cpu_layout_known():
        w = dequantize_int4(unpack_int4_cpu(packed), sz, group_size, x2.dtype)
        return F.linear(x2, w[:out_features])
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group_size, sz.to(x2.dtype))
    return y if y.shape[1] == out_features else y[:, :out_features].contiguous()


class Int4Config(QuantizationConfig):
    """`group_size` (128, 64 or 32; default 128) may come from a quantization_config dict, e.g.
    LLM(model, hf_overrides={"quantization_config": {"quant_method": "int4", "group_size": 32}})."""

    # As with int8: the LM head is the largest matmul of a small model's decode step, so a tied
    # head gets an int4 copy; the embedding lookup keeps its table.
    quantizes_tied_lm_head = True

    def __init__(self, group_size: int = GROUP_SIZES[0]) -> None:
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {list(GROUP_SIZES)}, got {group_size!r}")
        self.group_size = group_size

    def __repr__(self) -> str:
        return f"Int4Config(group_size={self.group_size})"

    @classmethod
    def get_name(cls) -> str:
        return "int4"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Int4Config":
        return cls(group_size=cls.get_from_keys(config, ["group_size"], GROUP_SIZES[0]))

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        from folovllm.model_executor.layers.linear import LinearBase
        from folovllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        if isinstance(layer, (LinearBase, ParallelLMHead)):
            return Int4LinearMethod(self.group_size)
        return None


class Int4LinearMethod(QuantizeOnLoadMethod):
    def __init__(self, group_size: int = GROUP_SIZES[0]) -> None:
        self.group_size = group_size

    def quantize(self, layer: nn.Module) -> None:
        w = layer.weight.data
        dtype, device = w.dtype, w.device
        n, k = w.shape
        cpu = uses_cpu_kernel(device)
        padded_k = _pad_to(k, 32)
        padded_n = _pad_to(n, BLOCK_N) if cpu else n
        group = pick_group_size(padded_k, self.group_size)
        if padded_k != k or padded_n != n:  # zero rows/columns: their products are sliced off or times 0
            w = F.pad(w, (0, padded_k - k, 0, padded_n - n))
        codes, scales, zeros = quantize_int4_groups(w, group, dtype)
        layer.register_buffer("weight_int4", pack_int4_cpu(codes) if cpu else pack_int4_plain(codes),
                              persistent=False)
        layer.register_buffer("weight_scales_zeros", scales_and_zeros(scales[:, :n], zeros[:, :n], padded_n),
                              persistent=False)
        layer.int4_group_size = group
        layer.int4_in_features = k
        layer.int4_out_features = n
        layer.int4_cpu_layout = cpu

    @staticmethod
    def dequantized_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The weight the method computes with, [N, K_padded], in `dtype`."""
        packed = layer.weight_int4
        codes = unpack_int4_cpu(packed) if layer.int4_cpu_layout else unpack_int4_plain(packed)
        return dequantize_int4(codes, layer.weight_scales_zeros, layer.int4_group_size, dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        k, n = layer.int4_in_features, layer.int4_out_features
        x2 = x.reshape(-1, k)
        padded_k = layer.weight_int4.shape[1] * 2
        if padded_k != k:
            x2 = F.pad(x2, (0, padded_k - k))
        if layer.int4_cpu_layout:
            y = int4_cpu_linear(x2, layer.weight_int4, layer.int4_group_size, layer.weight_scales_zeros, n)
        else:
            y = F.linear(x2, self.dequantized_weight(layer, x2.dtype)[:n])
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], n)
