"""Which attention backend runs on a device. Kept apart from the backend interface
(backends/abstract.py), which every backend imports: the selector imports the backends."""

from __future__ import annotations

import torch

from folovllm.attention.backends.abstract import AttentionImpl


def get_attn_backend_cls(name: str, device: torch.device) -> type[AttentionImpl]:
    if name == "auto":
        name = "triton" if device.type == "cuda" and _has_triton_backend() else "torch"
    if name == "torch":
        from folovllm.attention.backends.torch_ref import TorchAttentionImpl
        return TorchAttentionImpl
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("attention_backend='triton' needs a CUDA device; use attention_backend='torch' on CPU")
        from folovllm.attention.backends.triton_attn import TritonAttentionImpl
        return TritonAttentionImpl
    raise ValueError(f"unknown attention backend {name!r}; choose 'torch' or 'triton'")


def _has_triton_backend() -> bool:
    import importlib.util
    return (importlib.util.find_spec("triton") is not None
            and importlib.util.find_spec("folovllm.attention.backends.triton_attn") is not None)
