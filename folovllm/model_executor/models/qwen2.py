"""Qwen2 / Qwen2.5: the Llama decoder with a bias on q, k and v (not on o)."""

from folovllm.model_executor.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_switches(config) -> dict[str, bool]:
        return {"qkv_bias": True, "qk_norm": False, "o_bias": False}
