"""Hugging Face architecture name -> model class."""

from __future__ import annotations

from torch import nn

from folovllm.model_executor.models.llama import LlamaForCausalLM
from folovllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from folovllm.model_executor.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


# Configs built from GGUF metadata name a model_type but no architecture.
MODEL_TYPE_TO_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def get_model_cls(hf_config) -> type[nn.Module]:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", None) in MODEL_TYPE_TO_ARCH:
        archs = [MODEL_TYPE_TO_ARCH[hf_config.model_type]]
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"model architecture(s) {archs or '(none named in config.json)'} are not supported; "
                     f"FoloVLLM runs {sorted(MODEL_REGISTRY)}")
