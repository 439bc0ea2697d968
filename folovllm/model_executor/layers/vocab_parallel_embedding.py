"""Token embedding and the LM head (which may share the embedding's weight), split over the
tensor-parallel ranks by vocabulary.

Rank r of tp holds rows [r*P, (r+1)*P) of the [vocab, hidden] table, P = ceil(vocab / tp) (the
last rank's rows past the vocabulary are zeros). The embedding looks up the ids in its range,
zeroes the others and all-reduces, so every rank ends with every token's embedding; the LM head
computes its P logits per token and all-gathers them, so every rank has the full logits and
samples the same tokens. At tp = 1 both are the plain table. A quantized LM head stays whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from folovllm.distributed.parallel_state import (get_tensor_model_parallel_rank,
                                                 get_tensor_model_parallel_world_size,
                                                 tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce)
from folovllm.model_executor.layers.quantization.base_config import LinearMethodBase, QuantizationConfig
from folovllm.model_executor.utils import check_weight_shape, set_weight_attrs


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self._split_vocab()
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype),
                                   requires_grad=False)
        set_weight_attrs(self.weight, {"output_dim": 0, "weight_loader": self.weight_loader})

    def _split_vocab(self) -> None:
        self.tp_size = get_tensor_model_parallel_world_size()
        per = -(-self.num_embeddings // self.tp_size)
        self.num_embeddings_per_partition = per
        self.vocab_start = get_tensor_model_parallel_rank() * per
        self.vocab_end = min(self.vocab_start + per, self.num_embeddings)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None,
                      name: str = "") -> None:
        """The checkpoint's whole [vocab, hidden] table; this rank keeps its rows."""
        check_weight_shape(loaded_weight, (self.num_embeddings, *param.shape[1:]), name)
        n = self.vocab_end - self.vocab_start
        if n < param.shape[0]:
            param.data[n:].zero_()
        param.data[:n].copy_(loaded_weight[self.vocab_start:self.vocab_end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * mine, self.weight)
        out.masked_fill_(~mine.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary. A quant config may claim the LM head (asked by its
    prefix, like a linear layer); by default, or when the weight is tied to the embedding, it
    is a plain matmul with the [vocab, hidden] weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 tied_embedding: VocabParallelEmbedding | None = None) -> None:
        nn.Module.__init__(self)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self.quant_method: LinearMethodBase | None = None
        self._split_vocab()
        if tied_embedding is not None:
            self.weight = tied_embedding.weight
            # A method that keeps its own copy of the head (int8 on CPU) may take a tied one too:
            # the embedding keeps its table, the head gets a quantized copy after loading.
            if quant_config is not None and getattr(quant_config, "quantizes_tied_lm_head", False):
                self.quant_method = quant_config.get_quant_method(self, prefix)
            return
        if quant_config is not None:
            self.quant_method = quant_config.get_quant_method(self, prefix)
        if self.quant_method is not None:  # a quantized head stays whole on every rank
            self.tp_size, self.num_embeddings_per_partition = 1, num_embeddings
            self.vocab_start, self.vocab_end = 0, num_embeddings
        if self.quant_method is None:
            self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim,
                                                   dtype=params_dtype), requires_grad=False)
            set_weight_attrs(self.weight, {"output_dim": 0, "input_dim": 1, "weight_loader": self.weight_loader})
        else:
            self.quant_method.create_weights(self, embedding_dim, [num_embeddings], embedding_dim, num_embeddings,
                                             params_dtype or torch.get_default_dtype(),
                                             weight_loader=self.weight_loader)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight) if self.quant_method is None else self.quant_method.apply(self, hidden)
        if self.tp_size == 1:
            return logits
        return tensor_model_parallel_all_gather(logits, dim=-1)[..., :self.num_embeddings]
