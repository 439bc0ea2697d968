"""The GPTQ checkpoint format unpacked by hand from its definition (bit shifts written out, not
the project's unpacking): what the quantizer's tests check the written tensors against."""

from __future__ import annotations

import torch


def _u32(t: torch.Tensor) -> torch.Tensor:
    """The int32 words as unsigned 32-bit values (in int64)."""
    return t.to(torch.int64) & 0xFFFFFFFF


def hand_unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """W_q[k, n] = (qweight[k // p, n] >> (b * (k % p))) & (2**b - 1)."""
    p, mask = 32 // bits, 2**bits - 1
    words = _u32(qweight)
    return torch.stack([(words[k // p] >> (bits * (k % p))) & mask for k in range(words.shape[0] * p)])


def hand_unpack_qzeros(qzeros: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """z[g, n] = (qzeros[g, n // p] >> (b * (n % p))) & mask, plus one (mod 2**b) in v1."""
    p, mask = 32 // bits, 2**bits - 1
    words = _u32(qzeros)
    z = torch.stack([(words[:, n // p] >> (bits * (n % p))) & mask for n in range(words.shape[1] * p)], dim=1)
    return (z + 1) % 2**bits if fmt == "gptq" else z


def hand_dequant(tensors: dict, prefix: str, bits: int, fmt: str) -> torch.Tensor:
    """W[k, n] = scales[g_idx[k], n] * (W_q[k, n] - z[g_idx[k], n]), returned as [N, K]."""
    q = hand_unpack_qweight(tensors[f"{prefix}.qweight"], bits).float()
    z = hand_unpack_qzeros(tensors[f"{prefix}.qzeros"], bits, fmt).float()
    s = tensors[f"{prefix}.scales"].float()
    g = tensors[f"{prefix}.g_idx"].long()
    return (s[g] * (q - z[g])).T
