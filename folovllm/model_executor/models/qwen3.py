"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before rotary."""

from folovllm.model_executor.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_switches(config) -> dict[str, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "qk_norm": True, "o_bias": bias}
