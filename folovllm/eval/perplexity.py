"""Held-out perplexity over fixed sliding windows, as the Hugging Face perplexity guide does it.

Windows of `window` tokens start every `stride` tokens; each scores only the tokens the previous
window did not (its first window - stride tokens are context), so with stride < window every
token after the first is scored once, with up to window - 1 tokens before it (with stride ==
window the windows are disjoint and each one's first token, having no context, is not scored).
The windows depend only on the token count, so two models over the same text see the same
windows.

The model runs as one full causal sequence per window through its own forward with no KV cache
(attn_metadata=None: the attention layer's plain causal attention, the path the memory profile
uses), on any device; only the scored rows go through the LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float      # natural log, summed over the scored tokens
    num_tokens: int     # tokens scored
    num_windows: int


def check_windows(window: int, stride: int, max_windows: int | None = None) -> None:
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"perplexity needs window >= 2 and 1 <= stride <= window, got window={window}, "
                         f"stride={stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")


def sliding_windows(num_tokens: int, window: int, stride: int, max_windows: int | None = None
                    ) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over `num_tokens` tokens."""
    check_windows(window, stride, max_windows)
    if num_tokens < 2:
        raise ValueError(f"the text has {num_tokens} token(s); perplexity needs at least 2")
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens or (max_windows is not None and len(out) == max_windows):
            break
    return out


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int = 1024, stride: int = 512,
               max_windows: int | None = None, device: torch.device | str = "cpu") -> PerplexityResult:
    """exp(mean NLL) of `token_ids` under `model` (a FoloVLLM model: forward(ids, positions,
    None) -> hidden, compute_logits(hidden) -> logits)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=device)
    spans = sliding_windows(ids.numel(), window, stride, max_windows)
    nll, count = 0.0, 0
    for begin, end, first in spans:
        hidden = model(ids[begin:end], torch.arange(end - begin, device=device), None)
        logits = model.compute_logits(hidden[first - 1 - begin:end - 1 - begin])
        nll += float(F.cross_entropy(logits.float(), ids[first:end], reduction="sum"))
        count += end - first
    return PerplexityResult(math.exp(nll / count), nll, count, len(spans))
