"""The quantization seam. A `QuantizationConfig` is read from config.json's
`quantization_config` and, for each layer the model builds, names the `LinearMethodBase` that
creates that layer's parameters, runs its matmul and post-processes its weights after loading.
Layers never look at the method's name; a new method plugs in without touching model code."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

_MISSING = object()


class LinearMethodBase(ABC):
    """How one linear layer's weights are stored and multiplied."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs) -> None:
        """Register this rank's parameters on `layer`. `output_partition_sizes` are the logical
        output sizes of this rank's parts (one per merged checkpoint matrix: q, k, v or gate,
        up); `input_size`/`output_size` are the whole layer's. Each parameter gets its layout
        with set_weight_attrs (input_dim, output_dim, packed_dim, packed_factor) and the
        `extra_weight_attrs` (the layer's weight_loader), so the layer can load its shards."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., input_size_per_partition] -> [..., sum(output_partition_sizes)], plus bias."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Runs once every weight is loaded (or dummy-filled): repack, transpose, build a
        kernel's workspace. The missing-weights check has run before, on the created params."""
        return None


class QuantizationConfig(ABC):
    """One quantization method's settings, parsed from a checkpoint's quantization_config."""

    @classmethod
    @abstractmethod
    def get_name(cls) -> str:
        """The method name, as config.json's quant_method spells it (lower case)."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizationConfig":
        """Parse the `quantization_config` dict of config.json."""

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """The method for `layer` (named by its dotted prefix, e.g.
        model.layers.0.self_attn.qkv_proj), or None to leave the layer unquantized."""

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @staticmethod
    def get_from_keys(config: dict[str, Any], keys: list[str], default: Any = _MISSING) -> Any:
        """The value of the first of `keys` present in config (checkpoint writers disagree on
        names, e.g. bits / w_bit)."""
        for key in keys:
            if key in config:
                return config[key]
        if default is _MISSING:
            raise ValueError(f"quantization_config in config.json has none of {keys}: {config}")
        return default
