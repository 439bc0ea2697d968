"""Quantization methods by name. A method registers its QuantizationConfig with
`@register_quantization_config("name")`; ModelConfig validates config.json's
quantization_config.quant_method (or a user's quantization=) through
get_quantization_config_cls, and get_model builds the config from the checkpoint's dict."""

from __future__ import annotations

from folovllm.model_executor.layers.quantization.base_config import LinearMethodBase, QuantizationConfig

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {}


def register_quantization_config(name: str):
    """Class decorator: make a QuantizationConfig loadable by its method name."""
    key = name.lower()

    def register(cls: type[QuantizationConfig]) -> type[QuantizationConfig]:
        if not (isinstance(cls, type) and issubclass(cls, QuantizationConfig)):
            raise TypeError(f"{cls!r} is not a QuantizationConfig subclass")
        old = QUANTIZATION_METHODS.get(key)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"quantization method {name!r} is already registered by {old.__qualname__}")
        QUANTIZATION_METHODS[key] = cls
        return cls

    return register


def get_quantization_config_cls(name: str) -> type[QuantizationConfig]:
    key = name.lower() if isinstance(name, str) else name
    if key not in QUANTIZATION_METHODS:
        supported = ", ".join(sorted(QUANTIZATION_METHODS)) or "none yet (only unquantized models)"
        raise ValueError(f"quantization method {name!r} is not supported; supported methods: {supported} "
                         "(or 'none' for float weights)")
    return QUANTIZATION_METHODS[key]


from folovllm.model_executor.layers.quantization.gptq import GPTQConfig  # noqa: E402

register_quantization_config("gptq")(GPTQConfig)

from folovllm.model_executor.layers.quantization.int8 import Int8Config  # noqa: E402

register_quantization_config("int8")(Int8Config)

from folovllm.model_executor.layers.quantization.int4 import Int4Config  # noqa: E402

register_quantization_config("int4")(Int4Config)

__all__ = ["QUANTIZATION_METHODS", "LinearMethodBase", "QuantizationConfig", "get_quantization_config_cls",
           "register_quantization_config"]
