"""Parameter layout attributes: how a checkpoint tensor maps onto a parameter.

A parameter may carry, as plain Python attributes (they survive `param.data = ...`):
  input_dim / output_dim   which of its dims runs along the layer's input / output features
                           (absent: the parameter does not follow that dim, e.g. a g_idx has no
                           output dim and a per-tensor scale has neither);
  packed_dim, packed_factor  `packed_factor` logical values share one element along `packed_dim`
                           (GPTQ packs eight 4-bit values into an int32);
  weight_loader            weight_loader(param, loaded_weight, loaded_shard_id=None, name="")
                           copies this rank's shard of a checkpoint tensor into the parameter;
  init_dummy               init_dummy(param, generator, low, high) fills it with random
                           values for load_format="dummy" (default: uniform, norms stay 1).
"""

from __future__ import annotations

from typing import Any

import torch


def set_weight_attrs(weight: torch.Tensor, weight_attrs: dict[str, Any] | None) -> None:
    if not weight_attrs:
        return
    for key, value in weight_attrs.items():
        if hasattr(weight, key):
            raise AttributeError(f"parameter already has attribute {key!r}; a layout attribute is set once")
        setattr(weight, key, value)


def check_weight_shape(loaded: torch.Tensor, expected_shape, name: str) -> None:
    if tuple(loaded.shape) != tuple(expected_shape):
        raise ValueError(f"checkpoint tensor {name or '?'} has shape {tuple(loaded.shape)}, but the model "
                         f"config implies {tuple(expected_shape)}: the weights do not match config.json")


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, loaded_shard_id=None,
                          name: str = "") -> None:
    """The whole tensor, same shape (norm weights, replicated parameters)."""
    if loaded_shard_id is not None:
        raise ValueError(f"checkpoint tensor {name or '?'} is one part of a merged parameter, but the "
                         "parameter it maps to has no weight_loader that knows its parts")
    check_weight_shape(loaded_weight, param.shape, name)
    param.data.copy_(loaded_weight)
