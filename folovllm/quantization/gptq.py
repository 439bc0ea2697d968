"""GPTQ for one linear layer (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers").

The layer computes y = x W^T with W of shape [N, K] (nn.Linear's layout). GPTQ quantizes W one
input column at a time and, after each column, spreads that column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer's squared output error,
H = 2/n * sum_x x x^T. With the Cholesky factor U of H^-1 (upper, H^-1 = U^T U) the update of
column j is  W[:, j:] -= err_j * U[j, j:] / U[j, j]  (the paper's eq. 3 in Cholesky form). The
lazy-batch trick: inside a block of 128 columns the updates touch only the block; the rest of W
gets the block's errors in one matrix product when the block is done.

Group quantization: every `group_size` input columns (in quantization order) share a scale and a
zero point per output row, found by min-max over the group's columns as they are when the group
starts, i.e. already corrected for the error of every earlier column. Act-order (desc_act)
quantizes columns by descending Hessian diagonal, so the most active inputs are quantized first
while the most error-absorbing freedom is left; g_idx then records each input row's group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK_SIZE = 128


@dataclass
class QuantizedWeight:
    """A quantized nn.Linear weight, in the layer's own layout (rows = outputs).

    W[n, k] ~= scales[g_idx[k], n] * (qweight[n, k] - zeros[g_idx[k], n])
    """

    qweight: torch.Tensor  # int32 [N, K], codes in [0, 2**bits)
    scales: torch.Tensor   # float32 [G, N], exactly representable in float16
    zeros: torch.Tensor    # int32 [G, N], in [0, 2**bits)
    g_idx: torch.Tensor    # int32 [K]
    perm: torch.Tensor | None  # int64 [K]: the quantization order (act-order), None = identity
    bits: int
    group_size: int        # -1: one group over all of K

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.g_idx)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 weight from codes [N, K], scales/zeros [G, N] and g_idx [K]."""
    g = g_idx.long()
    return scales.float()[g].T * (qweight.float() - zeros.float()[g].T)


def check_args(bits: int, group_size: int, in_features: int, name: str = "the layer") -> int:
    """Validates bits / group_size for a layer of `in_features` inputs; returns the effective group
    size (in_features for -1)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 (the GPTQ checkpoint format packs 32 // bits codes "
                         f"per int32), got {bits}")
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1 (one group per row), got {group_size}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input size {in_features} of "
                         f"{name}; pick a divisor of {in_features} or -1")
    return group_size


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of w [N, g] by min-max (the range always includes 0, so a zero
    weight stays exactly zero). The scale is rounded to float16 here, as the checkpoint stores
    it, so the error that GPTQ propagates is the error of the weights that will really be used."""
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = xmax == xmin  # an all-zero row: any scale represents it
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).half().float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # float16 underflow
    if sym:
        zero = torch.full_like(scale, 2**(bits - 1))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (as floats) of w [N] or [N, g] given per-row scale and zero [N]."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


class GPTQ:
    """Accumulates the Hessian of one linear layer from its inputs, then quantizes its weight.

        gptq = GPTQ(layer.in_features)
        for x in inputs: gptq.add_batch(x)         # x [..., K]
        result = gptq.quantize(layer.weight, bits=4, group_size=128)
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features).to(self.H.dtype)
        n = x.shape[0]
        if n == 0:
            return
        # Running mean of 2 x x^T over every input row seen so far.
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * math.sqrt(2 / self.nsamples)
        self.H += x.T @ x

    def quantize(self, weight: torch.Tensor, **kwargs) -> QuantizedWeight:
        if self.nsamples == 0:
            raise ValueError("GPTQ.quantize before any add_batch: no calibration inputs reached the layer")
        return gptq_quantize(weight, self.H, **kwargs)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                  sym: bool = True, desc_act: bool = False, damp: float = 0.01,
                  block_size: int = BLOCK_SIZE) -> QuantizedWeight:
    """GPTQ of weight [N, K] under Hessian H [K, K] (see the module doc)."""
    N, K = weight.shape
    gs = check_args(bits, group_size, K)
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    device = weight.device
    W = weight.detach().to(torch.float32).clone()
    H = H.detach().to(device=device, dtype=torch.float64).clone()

    # An input that is always zero carries no information: pin its weight to 0 and give H a unit
    # diagonal there so that it stays invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=device, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky(Hinv, upper=True).to(torch.float32)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ValueError(f"the Hessian is not positive definite even after dampening by {damp}; "
                         f"raise --damp or use more calibration samples") from e

    Q = torch.zeros_like(W)
    G = K // gs
    scales = torch.zeros(G, N, device=device)
    zeros = torch.zeros(G, N, device=device)
    scale = zero = None
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                # The group's columns as they are now: those inside this block carry every update
                # so far, those past it every update up to the previous block (the lazy batch).
                g_end = col + gs
                cols = W1[:, i:min(g_end, i2) - i1]
                if g_end > i2:
                    cols = torch.cat([cols, W[:, i2:g_end]], dim=1)
                scale, zero = find_params(cols, bits, sym)
                scales[col // gs], zeros[col // gs] = scale, zero
            w = W1[:, i]
            q = quantize_codes(w, scale, zero, bits)
            Q[:, col] = q
            err = (w - scale * (q - zero)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    order = torch.arange(K, device=device) if perm is None else perm
    g_idx = torch.empty(K, dtype=torch.int32, device=device)
    g_idx[order] = (torch.arange(K, device=device) // gs).to(torch.int32)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return QuantizedWeight(qweight=Q.to(torch.int32), scales=scales, zeros=zeros.to(torch.int32),
                           g_idx=g_idx, perm=perm, bits=bits, group_size=group_size)
