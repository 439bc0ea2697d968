"""The Llama decoder, which Qwen2 and Qwen3 share: pre-norm blocks of GQA attention with rotary
positions and a SiLU-gated MLP. The variants differ only in switches: bias on QKV (Qwen2),
per-head RMSNorm on q and k (Qwen3), tied embeddings (config).

Every layer is built with the quant config and its dotted checkpoint prefix (e.g.
model.layers.0.self_attn.qkv_proj), and takes its share of heads and features from the
tensor-parallel state; this file never names a quantization method or a rank count."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from folovllm.attention.backends.abstract import AttentionImpl, AttentionMetadata
from folovllm.attention.layer import Attention
from folovllm.model_executor.layers.activation import SiluAndMul
from folovllm.model_executor.layers.layernorm import RMSNorm
from folovllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from folovllm.model_executor.layers.quantization.base_config import QuantizationConfig
from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from folovllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from folovllm.model_executor.utils import default_weight_loader


def maybe_prefix(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def neox_factors(cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 1, D] float32 (cos, cos) and (-sin, sin) of the positions, for rotate_neox."""
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, N, D] rotated as RotaryEmbedding does (halves x1, x2 -> x1 cos - x2 sin,
    x2 cos + x1 sin, in float32), bit for bit, in a third of its ops: on CPU each op costs ~2 us
    however small, and a decode step runs these for every layer."""
    xf = x.float()
    half = x.shape[-1] // 2
    swapped = torch.cat([xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + swapped * sin).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config, attn_impl: type[AttentionImpl], dtype: torch.dtype,
                 rotary_emb: RotaryEmbedding, qkv_bias: bool, qk_norm: bool, o_bias: bool,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads, qkv_bias,
                                          dtype, quant_config, maybe_prefix(prefix, "qkv_proj"))
        # This rank's heads: q heads split over the ranks, KV heads split or replicated.
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, o_bias, params_dtype=dtype,
                                        quant_config=quant_config, prefix=maybe_prefix(prefix, "o_proj"))
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads, attn_impl,
                              prefix=maybe_prefix(prefix, "attn"))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                attn_metadata: AttentionMetadata | None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if rope is not None and self.q_norm is None:
            # CPU: q and k side by side in qkv's output, rotated as one [T, H + KVH, D] tensor.
            t, qk_size = qkv.shape[0], self.q_size + self.kv_size
            qk = rotate_neox(qkv[:, :qk_size].view(t, -1, self.head_dim), *rope)
            q, k, v = qk[:, :self.num_heads], qk[:, self.num_heads:], qkv[:, qk_size:]
            return self.o_proj(self.attn(q, k, v, attn_metadata))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        kv_written = False
        if q.is_cuda:
            # One kernel for q/k norm and rotary, in place on the column slices of the qkv output;
            # where the backend allows, the same kernel stores k and v in the paged cache.
            from folovllm.model_executor.layers import fused_ops
            norm = self.q_norm is not None
            kv_written = self.attn.writes_kv_in_model(attn_metadata)
            cache_args = dict(v=v, kv_cache=self.attn.kv_cache, slot_mapping=attn_metadata.slot_mapping) \
                if kv_written else {}
            q, k = fused_ops.qk_norm_rope(
                q, k, positions, self.rotary_emb.cos_sin_cache, self.q_norm.weight if norm else None,
                self.k_norm.weight if norm else None, self.q_norm.eps if norm else 0.0, **cache_args)
        else:
            if self.q_norm is not None:
                q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
                k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
            if rope is not None:
                t = q.shape[0]
                q = rotate_neox(q.view(t, -1, self.head_dim), *rope)
                k = rotate_neox(k.view(t, -1, self.head_dim), *rope)
            else:
                q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, attn_metadata, kv_written))


class LlamaMLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias,
                                                       params_dtype=dtype, quant_config=quant_config,
                                                       prefix=maybe_prefix(prefix, "gate_up_proj"))
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias, params_dtype=dtype,
                                           quant_config=quant_config, prefix=maybe_prefix(prefix, "down_proj"))
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported; only 'silu' is")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self.down_proj(self.act_fn(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj.forward_parts(x)
        # In place in the gate's half: a prefill of 1,600 tokens would otherwise hold two more
        # [T, intermediate] tensors (31 MB on Qwen2.5-0.5B) at its peak.
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, attn_impl, dtype, rotary_emb, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", **attn_switches) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, attn_impl, dtype, rotary_emb, **attn_switches,
                                        quant_config=quant_config, prefix=maybe_prefix(prefix, "self_attn"))
        self.mlp = LlamaMLP(config, dtype, quant_config, maybe_prefix(prefix, "mlp"))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, positions, hidden, residual, attn_metadata, rope=None):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_metadata, rope)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, attn_impl, dtype, quant_config: QuantizationConfig | None = None, prefix: str = "",
                 **attn_switches) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, quant_config,
                                                   maybe_prefix(prefix, "embed_tokens"))
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rotary_emb = RotaryEmbedding(config, head_dim, config.max_position_embeddings, dtype)
        self.rotary_emb = rotary_emb  # the layers' shared table (a module registered here too)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, attn_impl, dtype, rotary_emb, quant_config, maybe_prefix(prefix, f"layers.{i}"),
                              **attn_switches)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        # ids -> embedding rows, in place of embed_tokens' table when the loader keeps the table
        # in the checkpoint file (a GGUF file on CPU: model_loader.embedding_from_file).
        self.embedding_rows = None

    def forward(self, input_ids, positions, attn_metadata):
        hidden = self.embed_tokens(input_ids) if self.embedding_rows is None else self.embedding_rows(input_ids)
        residual = None
        # CPU: the step's rotary factors once for every layer (CUDA: fused into one kernel a layer).
        rope = None if hidden.is_cuda else neox_factors(self.rotary_emb.cos_sin_cache, positions)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, attn_metadata, rope)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our merged parameter, which part of it)
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, config, attn_impl: type[AttentionImpl], dtype: torch.dtype,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.model = LlamaModel(config, attn_impl, dtype, quant_config, maybe_prefix(prefix, "model"),
                                **self.attention_switches(config))
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype, quant_config,
                                      maybe_prefix(prefix, "lm_head"), tied_embedding=tied)

    @staticmethod
    def attention_switches(config) -> dict[str, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "qk_norm": False, "o_bias": bias}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (HF name, tensor) pairs, each through its parameter's weight_loader (which takes
        this rank's shard); return what was filled: parameter names, `name#shard` for a part
        of a merged parameter."""
        params = dict(self.named_parameters(remove_duplicate=False))
        tied = getattr(self.config, "tie_word_embeddings", False)
        loaded: set[str] = set()
        for name, tensor in weights:
            if not ("rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight")):
                loaded.add(self._load_named(params, name, tensor))
            # Not held while the loader builds the next tensor (a float LM head or embedding
            # table is 0.27 GB in bfloat16 on Qwen2.5-0.5B).
            del tensor
        return loaded

    def _load_named(self, params, name: str, tensor: torch.Tensor) -> str:
        for merged, part, shard in self.stacked_params_mapping:
            if f".{part}." in name:
                target = name.replace(f".{part}.", f".{merged}.")
                self._load(params, target, tensor, name, shard)
                return f"{target}#{shard}"
        self._load(params, name, tensor, name, None)
        return name

    def _load(self, params, target: str, tensor: torch.Tensor, name: str, shard: int | None) -> None:
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}: "
                             "the checkpoint does not match this architecture")
        getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard, name)

    def expected_weight_names(self) -> set[str]:
        """What load_weights must report for a complete checkpoint: every parameter the layers'
        quant methods created (weight, or qweight, scales, ...), once per part where merged."""
        shards: dict[str, list[int]] = {}
        for merged, _, shard in self.stacked_params_mapping:
            shards.setdefault(merged, []).append(shard)
        names = set()
        for name, _ in self.named_parameters():
            merged = next((m for m in shards if f".{m}." in name), None)
            if merged:
                names.update(f"{name}#{i}" for i in shards[merged])
            else:
                names.add(name)
        if getattr(self.config, "tie_word_embeddings", False):
            names.discard("lm_head.weight")
        return names
