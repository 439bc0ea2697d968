"""Round-to-nearest: the baseline GPTQ is measured against. Each group of input columns gets the
same min-max scale and zero point as in GPTQ, and every weight is rounded on its own, with no
error feedback and no calibration data."""

from __future__ import annotations

import torch

from folovllm.quantization.gptq import QuantizedWeight, check_args, find_params, quantize_codes


@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                 sym: bool = True) -> QuantizedWeight:
    N, K = weight.shape
    gs = check_args(bits, group_size, K)
    W = weight.detach().to(torch.float32)
    G = K // gs
    groups = W.reshape(N, G, gs).transpose(0, 1)  # [G, N, gs]
    scales = torch.empty(G, N, device=W.device)
    zeros = torch.empty(G, N, device=W.device)
    Q = torch.empty_like(groups)
    for g in range(G):
        scales[g], zeros[g] = find_params(groups[g], bits, sym)
        Q[g] = quantize_codes(groups[g], scales[g], zeros[g], bits)
    Q = Q.transpose(0, 1).reshape(N, K)
    g_idx = (torch.arange(K, device=W.device) // gs).to(torch.int32)
    return QuantizedWeight(qweight=Q.to(torch.int32), scales=scales, zeros=zeros.to(torch.int32),
                           g_idx=g_idx, perm=None, bits=bits, group_size=group_size)
