"""GPTQ checkpoints (AutoGPTQ / GPTQModel's standard format) through the quantization seam.

A GPTQ linear layer of K input and N output features, b bits (p = 32 // b values per int32)
and G groups stores:

  qweight  int32 [K // p, N]   W_q[k, n] = (qweight[k // p, n] >> (b * (k % p))) & (2**b - 1)
  qzeros   int32 [G, N // p]   z[g, n]   = (qzeros[g, n // p] >> (b * (n % p))) & (2**b - 1)
  scales   float [G, N]
  g_idx    int32 [K]           the group of input row k (k // group_size, or a permutation of
                               that with desc_act, "act-order")

and W[k, n] = scales[g_idx[k], n] * (W_q[k, n] - z[g_idx[k], n]); y = x @ W + bias.

checkpoint_format "gptq" (v1, what AutoGPTQ writes) stores z - 1 in each field, wrapped modulo
2**b; "gptq_v2" stores z. process_weights_after_loading rewrites v1 zeros as v2 once, so the
forward (and the GPU kernel) always sees real zeros.

Layouts for the loaders (folovllm/model_executor/utils.py): qweight's output dim is not packed
(merged q/k/v and gate/up parts sit at their plain offsets), qzeros' is (offsets divide by p);
qweight is packed along the input. Row-parallel ranks take whole groups: scales and qzeros are
split along their group dim, except with desc_act (a rank's rows then use groups from all over)
or a single group, where every rank holds all of them and g_idx picks.

On CPU, 4-bit layers are repacked once after loading for PyTorch's int4 kernel (int4.py): the
rows sorted by group when act-order shuffled them (the forward permutes x's columns to match), each
checkpoint group split into kernel groups of 256/128/64/32 rows, zeros folded into the kernel's
float convention; many rows at once dequantize from the packed codes instead (int4.DENSE_FROM_ROWS).
With bfloat16 activations the checkpoint's qweight is freed then (with float32 it stays, for code
that reads it). 8-bit layers, and groups the kernel cannot take, keep the dequantizing forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from folovllm.model_executor.layers.quantization.base_config import LinearMethodBase, QuantizationConfig
from folovllm.model_executor.utils import set_weight_attrs

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class GPTQConfig(QuantizationConfig):
    def __init__(self, bits: int, group_size: int, desc_act: bool, sym: bool = True,
                 checkpoint_format: str = "gptq") -> None:
        if bits not in (4, 8):
            raise ValueError(f"GPTQ with bits={bits!r} is not supported; quantization_config.bits must be 4 or 8")
        if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise ValueError(f"GPTQ group_size must be -1 (one group) or a positive int, got {group_size!r}")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported; "
                             f"it must be one of {list(CHECKPOINT_FORMATS)}")
        self.bits = bits
        self.pack_factor = 32 // bits
        self.group_size = group_size
        self.desc_act = bool(desc_act)
        self.sym = bool(sym)
        self.checkpoint_format = checkpoint_format

    def __repr__(self) -> str:
        return (f"GPTQConfig(bits={self.bits}, group_size={self.group_size}, desc_act={self.desc_act}, "
                f"sym={self.sym}, checkpoint_format={self.checkpoint_format!r})")

    @classmethod
    def get_name(cls) -> str:
        return "gptq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQConfig":
        if cls.get_from_keys(config, ["lm_head"], False):
            raise ValueError("GPTQ checkpoints with a quantized lm_head are not supported (quantization_config "
                             "has lm_head: true)")
        fmt = cls.get_from_keys(config, ["checkpoint_format"], None) or "gptq"
        return cls(bits=cls.get_from_keys(config, ["bits", "w_bit"]),
                   group_size=cls.get_from_keys(config, ["group_size", "q_group_size"], 128),
                   desc_act=cls.get_from_keys(config, ["desc_act"], False),
                   sym=cls.get_from_keys(config, ["sym"], True),
                   checkpoint_format=str(fmt).lower())

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        from folovllm.model_executor.layers.linear import LinearBase

        # The decoder's linears only; the embedding and LM head stay in the float dtype.
        return GPTQLinearMethod(self) if isinstance(layer, LinearBase) else None


def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 -> int32 [R * p, C]."""
    vals = (packed.unsqueeze(1) >> _shifts(bits, packed.device).view(1, -1, 1)) & ((1 << bits) - 1)
    return vals.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 1 -> int32 [R, C * p]."""
    vals = (packed.unsqueeze(2) >> _shifts(bits, packed.device).view(1, 1, -1)) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0], -1)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [R, C * p] of b-bit values -> int32 [R, C], p values per int32 along dim 1."""
    p = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0], -1, p) << (bits * torch.arange(p, device=values.device))
    word = v.sum(dim=2)  # disjoint bit fields: the sum is their OR
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
               bits: int, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] in `dtype` from packed qweight, real (unpacked) zeros [G, N], scales [G, N].
    g_idx None: row k is in group k // (K // G), so whole groups broadcast instead of gathering."""
    q = unpack_rows(qweight, bits)
    if g_idx is None:
        k, n = q.shape
        g = zeros.shape[0]
        w = (q.view(g, k // g, n) - zeros.unsqueeze(1)).to(dtype) * scales.to(dtype).unsqueeze(1)
        return w.view(k, n)
    g = g_idx.long()
    return (q - zeros[g]).to(dtype) * scales[g].to(dtype)


class GPTQLinearMethod(LinearMethodBase):
    def __init__(self, quant_config: GPTQConfig) -> None:
        self.quant_config = quant_config

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs) -> None:
        cfg = self.quant_config
        name = getattr(layer, "prefix", "") or type(layer).__name__
        p = cfg.pack_factor
        group_size = cfg.group_size if cfg.group_size != -1 else input_size
        if input_size_per_partition % group_size:
            raise ValueError(f"GPTQ layer {name}: its input size per partition ({input_size_per_partition}) is not "
                             f"divisible by group_size ({group_size}); this checkpoint cannot be split so")
        if input_size_per_partition % p:
            raise ValueError(f"GPTQ layer {name}: its input size per partition ({input_size_per_partition}) is not "
                             f"divisible by the pack factor ({p} values of {cfg.bits} bits per int32)")
        for size in output_partition_sizes:
            if size % p:
                raise ValueError(f"GPTQ layer {name}: an output part of {size} features is not divisible by the "
                                 f"pack factor ({p}), so its qzeros cannot be packed")
        out = sum(output_partition_sizes)
        split = input_size_per_partition != input_size
        if cfg.group_size == -1 or (cfg.desc_act and split):
            # Every rank holds every group: one group, or act-order rows that use any group.
            num_groups, group_dim = input_size // group_size, None
        else:
            num_groups, group_dim = input_size_per_partition // group_size, 0
        # This rank's first group, which g_idx (global groups) counts from in a row-parallel shard.
        layer.gptq_group_offset = getattr(layer, "tp_rank", 0) * num_groups if split and group_dim == 0 else 0

        def param(shape, dtype, attrs):
            t = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(t, {**attrs, **extra_weight_attrs})
            return t

        def dummy_qweight(t, generator, low, high):
            t.data.copy_(torch.randint(-2**31, 2**31 - 1, tuple(t.shape), generator=generator, dtype=torch.int64)
                         .to(torch.int32))

        def dummy_g_idx(t, generator, low, high):
            t.data.copy_((torch.arange(t.shape[0]) // group_size).clamp(max=num_groups - 1))

        layer.register_parameter("qweight", param(
            (input_size_per_partition // p, out), torch.int32,
            {"input_dim": 0, "output_dim": 1, "packed_dim": 0, "packed_factor": p, "init_dummy": dummy_qweight}))
        layer.register_parameter("g_idx", param(
            (input_size_per_partition,), torch.int32, {"input_dim": 0, "init_dummy": dummy_g_idx}))
        load = extra_weight_attrs.get("weight_loader")
        if load is not None:
            layer.g_idx.weight_loader = lambda p, t, shard=None, name="": self._load_g_idx(layer, load, p, t, shard,
                                                                                          name)
        group_attrs = {} if group_dim is None else {"input_dim": group_dim}
        layer.register_parameter("qzeros", param(
            (num_groups, out // p), torch.int32,
            {**group_attrs, "output_dim": 1, "packed_dim": 1, "packed_factor": p}))
        layer.register_parameter("scales", param((num_groups, out), params_dtype, {**group_attrs, "output_dim": 1}))

    @staticmethod
    def _load_g_idx(layer, load, param, loaded, shard_id, name) -> None:
        """A merged layer (q/k/v, gate/up) has one g_idx; every part's must be that one."""
        load(param, loaded, shard_id, name)
        if shard_id is None:
            return
        first = getattr(layer, "_gptq_first_g_idx", None)
        if first is None:
            layer._gptq_first_g_idx = (name, param.data.clone())
        elif not torch.equal(first[1], param.data):
            raise ValueError(f"GPTQ layer {layer.prefix}: {name} differs from {first[0]}; the parts of a merged "
                             "layer share their input, so their act-order (g_idx) must be the same")

    def process_weights_after_loading(self, layer) -> None:
        cfg = self.quant_config
        layer.__dict__.pop("_gptq_first_g_idx", None)
        zeros = unpack_cols(layer.qzeros.data, cfg.bits)
        if cfg.checkpoint_format == "gptq":
            zeros = (zeros + 1) & ((1 << cfg.bits) - 1)
        # From here on qzeros holds real zeros (v2), for the kernel; the forward's unpacked copy
        # is G x N small integers, 1/group_size of the weight's values.
        layer.qzeros.data = pack_cols(zeros, cfg.bits)
        layer.gptq_zeros = zeros.to(torch.int16)
        num_groups = layer.scales.shape[0]
        if layer.gptq_group_offset:
            layer.g_idx.data = layer.g_idx.data - layer.gptq_group_offset
        g_idx = layer.g_idx.data
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups):
            raise ValueError(f"GPTQ layer {getattr(layer, 'prefix', '?')}: g_idx holds groups in "
                             f"[{int(g_idx.min())}, {int(g_idx.max())}] but the layer has {num_groups} group(s); "
                             "the checkpoint's g_idx does not match its group_size")
        # Without act-order (rows in group order, K // G each) the forward need not gather.
        k = g_idx.numel()
        plain = k % num_groups == 0 and torch.equal(
            g_idx.long(), torch.arange(k, device=g_idx.device) // max(1, k // num_groups))
        layer.gptq_g_idx = None if plain else g_idx
        layer.gptq_group_size = k // num_groups if plain else cfg.group_size
        layer.register_buffer("gptq_int4", None, persistent=False)
        layer.register_buffer("gptq_perm", None, persistent=False)
        if layer.qweight.device.type == "cpu" and cfg.bits == 4:
            _repack_for_cpu(layer)
        elif layer.qweight.device.type != "cpu" and layer.gptq_g_idx is not None:
            _sort_act_order_rows(layer, cfg.bits)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.quant_config
        if x.is_cuda:
            kernel = _triton_kernel()
            if kernel is not None:
                y = kernel(x.reshape(-1, x.shape[-1]), layer.qweight, layer.qzeros, layer.scales, layer.gptq_g_idx,
                           cfg.bits, layer.gptq_group_size, perm=layer.gptq_perm)
                y = y.reshape(*x.shape[:-1], y.shape[-1])
                return y if bias is None else y + bias
        if getattr(layer, "gptq_int4", None) is not None and x.device.type == "cpu":
            y = _apply_cpu(layer, x)
            return y if bias is None else y + bias
        w = dequantize(layer.qweight, layer.gptq_zeros, layer.scales, layer.gptq_g_idx, cfg.bits, x.dtype)
        if layer.gptq_perm is not None:  # rows sorted by group: weight row k meets x's column perm[k]
            x = x.index_select(-1, layer.gptq_perm)
        y = x @ w
        return y if bias is None else y + bias


def _sort_act_order_rows(layer, bits: int) -> None:
    """Off CPU, once after loading: an act-order layer's rows sorted by group (the Triton
    kernels' gptq_prepare), so that the kernels read one scale and zero row per K tile and take
    their fast paths (GEMV, swap) instead of gathering a group per row; the forward reads x's
    columns through gptq_perm. A g_idx that no sort turns into consecutive groups is kept as it
    is, and so is every layer where the kernels are not installed."""
    if _triton_kernel() is None:
        return
    from folovllm.model_executor.layers.quantization.kernels.gptq_triton import gptq_prepare
    prepared = gptq_prepare(layer.qweight.data, layer.qzeros.data, layer.scales.data, layer.gptq_g_idx, bits,
                            layer.gptq_group_size)
    if prepared.perm is None:
        return
    layer.qweight.data = prepared.qweight
    layer.gptq_perm = prepared.perm
    layer.gptq_g_idx = None


# ---- CPU: 4-bit checkpoints on PyTorch's int4 kernel ----------------------------------------------

def cpu_kernel_group_size(layer) -> tuple[int | None, torch.Tensor | None, str]:
    """(the kernel's group size, the input permutation or None, why not) for a loaded 4-bit layer.
    Rows go to the kernel in group order: without act-order they are already; with it they are
    sorted by g_idx, which works when every group then covers group_size consecutive rows (the
    standard act-order checkpoint). The checkpoint's group may be a multiple of the kernel's (a
    group of 512, or one group of K): its scale and zero are then repeated."""
    from folovllm.model_executor.layers.quantization.int4 import KERNEL_GROUP_SIZES

    k, num_groups = layer.g_idx.shape[0], layer.scales.shape[0]
    if k % num_groups:
        return None, None, f"{k} input rows do not split into {num_groups} equal groups"
    group = k // num_groups
    perm = None
    if layer.gptq_g_idx is not None:
        perm = torch.argsort(layer.gptq_g_idx.long(), stable=True)
        if not torch.equal(layer.gptq_g_idx.long()[perm], torch.arange(k, device=perm.device) // group):
            return None, None, "its act-order groups do not each hold group_size rows"
    kernel_group = next((g for g in KERNEL_GROUP_SIZES if group % g == 0), None)
    if kernel_group is None:
        return None, None, f"its group of {group} rows is not a multiple of 32"
    return kernel_group, perm, ""


def _repack_for_cpu(layer) -> None:
    """Once after loading: the codes, scales and zeros in the CPU int4 kernel's layout, so a
    forward reads 4 bits per weight instead of dequantizing the layer. Layers the kernel cannot
    take keep the dequantizing forward."""
    from folovllm.model_executor.layers.quantization import int4

    kernel_group, perm, _ = cpu_kernel_group_size(layer)
    if kernel_group is None:
        return
    codes = unpack_rows(layer.qweight.data, 4)  # [K, N]
    k, n = codes.shape
    if perm is not None:
        codes = codes[perm]
    padded_n = -(-n // int4.BLOCK_N) * int4.BLOCK_N
    codes = torch.nn.functional.pad(codes.t(), (0, 0, 0, padded_n - n))
    repeat = k // layer.scales.shape[0] // kernel_group
    scales = layer.scales.data.repeat_interleave(repeat, dim=0)
    # scales * (q - z) = (q - 8) * scales + (8 - z) * scales
    zeros = ((8 - layer.gptq_zeros.repeat_interleave(repeat, dim=0)).float() * scales.float()).to(scales.dtype)
    # Buffers, so that the model's size (and .to()) sees them.
    layer.register_buffer("gptq_int4", int4.pack_int4_cpu(codes), persistent=False)
    layer.register_buffer("gptq_int4_sz", int4.scales_and_zeros(scales, zeros, padded_n), persistent=False)
    layer.register_buffer("gptq_int4_perm", perm, persistent=False)
    layer.gptq_int4_group_size = kernel_group
    if scales.dtype == torch.bfloat16:
        # bfloat16 activations always take the kernel: the checkpoint's codes would be a second copy.
        layer.qweight.data = torch.empty(0, n, dtype=torch.int32)


def _apply_cpu(layer, x: torch.Tensor) -> torch.Tensor:
    from folovllm.model_executor.layers.quantization import int4

    n = layer.scales.shape[1]
    x2 = x.reshape(-1, x.shape[-1])
    if layer.gptq_int4_perm is not None:
        x2 = x2.index_select(1, layer.gptq_int4_perm)
    y = int4.int4_cpu_linear(x2, layer.gptq_int4, layer.gptq_int4_group_size, layer.gptq_int4_sz, n)
    return y.reshape(*x.shape[:-1], n)


_KERNEL: Any = None


def _triton_kernel():
    """The Triton GPTQ matmul if it imports (a GPU with Triton), else None: dequantize instead."""
    global _KERNEL
    if _KERNEL is None:
        try:
            from folovllm.model_executor.layers.quantization.kernels.gptq_triton import gptq_matmul
            _KERNEL = gptq_matmul
        except ImportError:
            _KERNEL = False
    return _KERNEL or None
