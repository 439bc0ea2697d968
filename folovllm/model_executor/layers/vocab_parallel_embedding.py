"""Token embedding and the LM head (which may share the embedding's weight).

Both are replicated on every tensor-parallel rank for now: each rank holds the whole
[vocab, hidden] table and computes full logits, so nothing after the LM head changes with tp.
Splitting the vocabulary is the seam left here: the weight already declares its vocab dim as
`output_dim` and loads through `weight_loader`; a vocab-parallel version narrows the
checkpoint tensor to [r*V/tp, (r+1)*V/tp) in weight_loader, masks out-of-range ids and
all-reduces in the embedding, and all-gathers the logits in the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from folovllm.model_executor.layers.quantization.base_config import LinearMethodBase, QuantizationConfig
from folovllm.model_executor.utils import check_weight_shape, set_weight_attrs


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        # Replicated: this rank's share of the vocabulary is all of it.
        self.num_embeddings_per_partition = num_embeddings
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=params_dtype),
                                   requires_grad=False)
        set_weight_attrs(self.weight, {"output_dim": 0, "weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None,
                      name: str = "") -> None:
        check_weight_shape(loaded_weight, param.shape, name)
        param.data.copy_(loaded_weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary. A quant config may claim the LM head (asked by its
    prefix, like a linear layer); by default, or when the weight is tied to the embedding, it
    is a plain matmul with the [vocab, hidden] weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 tied_embedding: VocabParallelEmbedding | None = None) -> None:
        nn.Module.__init__(self)
        self.num_embeddings = self.num_embeddings_per_partition = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self.quant_method: LinearMethodBase | None = None
        if tied_embedding is not None:
            self.weight = tied_embedding.weight
            return
        if quant_config is not None:
            self.quant_method = quant_config.get_quant_method(self, prefix)
        if self.quant_method is None:
            self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=params_dtype),
                                       requires_grad=False)
            set_weight_attrs(self.weight, {"output_dim": 0, "input_dim": 1, "weight_loader": self.weight_loader})
        else:
            self.quant_method.create_weights(self, embedding_dim, [num_embeddings], embedding_dim, num_embeddings,
                                             params_dtype or torch.get_default_dtype(),
                                             weight_loader=self.weight_loader)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant_method is None:
            return F.linear(hidden, self.weight)
        return self.quant_method.apply(self, hidden)
