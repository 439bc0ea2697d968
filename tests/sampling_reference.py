"""Independent references for the sampler tests: Pearson's chi-square, and the fused sampler's
documented noise recomputed in float64 numpy (Philox4x32-10 written out from its definition)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chi2


def key(i: int) -> int:
    """A 64-bit key for index i (distinct for distinct i, spread over the whole range, signed)."""
    x = (i * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2 ** 64
    return x - 2 ** 64 if x >= 2 ** 63 else x


def keys(n: int, start: int = 0, device: str = "cpu") -> torch.Tensor:
    """n distinct keys as an int64 tensor."""
    return torch.tensor([key(start + i) for i in range(n)], dtype=torch.int64, device=device)


def chi2_critical(df: int, p: float = 1e-4) -> float:
    """The (1 - p) quantile of chi-square with df degrees of freedom."""
    return float(chi2.ppf(1 - p, df))


def chi2_statistic(observed: list[int], probs: list[float]) -> tuple[float, int]:
    """Pearson's statistic, with bins of expected count < 5 pooled into one. Returns (stat, df)."""
    n = sum(observed)
    bins, rest_obs, rest_exp = [], 0, 0.0
    for o, p in zip(observed, probs):
        if n * p >= 5:
            bins.append((o, n * p))
        else:
            rest_obs, rest_exp = rest_obs + o, rest_exp + n * p
    if rest_exp > 0:
        bins.append((rest_obs, rest_exp))
    return sum((o - e) ** 2 / e for o, e in bins), len(bins) - 1


def philox4x32_10(key: int, counters: np.ndarray) -> np.ndarray:
    """Philox4x32-10 (Salmon et al., 2011) of counters (c, 0, 0, 0) under a 64-bit key, written
    out in numpy: [4, len(counters)] words. Products of two 32-bit values fit in uint64 exactly."""
    mask = np.uint64(0xFFFFFFFF)
    c0 = counters.astype(np.uint64)
    c1, c2, c3 = np.zeros_like(c0), np.zeros_like(c0), np.zeros_like(c0)
    key &= (1 << 64) - 1
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    mul_a, mul_b, shift = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), np.uint64(32)
    for _ in range(10):
        pa, pb = mul_a * c0, mul_b * c2
        c0, c1, c2, c3 = (pb >> shift) ^ c1 ^ k0, pb & mask, (pa >> shift) ^ c3 ^ k1, pa & mask
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return np.stack([c0, c1, c2, c3])


def reference_sample(logits: torch.Tensor, temperature: float, key: int) -> int:
    """The documented noise, in float64: id v of tile v // 1024 takes word (v % 1024) // 256 of
    counter 256 * (v // 1024) + v % 256, and E = -log(1 - (word + 1/2) / 2^32); the token is
    argmax(logits / T - log E)."""
    v = np.arange(logits.shape[0])
    words = philox4x32_10(key, 256 * (v // 1024) + v % 256)[(v % 1024) // 256, v]
    e = -np.log1p(-(words.astype(np.float64) + 0.5) / 2 ** 32)
    return int(np.argmax(logits.double().cpu().numpy() / temperature - np.log(e)))
