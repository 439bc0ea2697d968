"""Batched sampler: raw logprobs, min_tokens, penalties, then greedy / filtered random sampling.

Everything stays on the logits' device and nothing reads a device value back to the host, so the
step can be queued behind the forward pass without a sync.

The common GPU step (temperature or greedy, nothing else) skips the PyTorch chain and goes
through a fused Triton kernel (sample/triton_sampler.py) that reads the logits once."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from folovllm.sample.metadata import SamplingMetadata, pad_token_ids, to_device

_GREEDY_EPS = 1e-5


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor          # [n] int64
    logprob_token_ids: torch.Tensor | None   # [n, k+1] int64: sampled token, then the top k ids
    logprobs: torch.Tensor | None            # [n, k+1] float32 matching logprob_token_ids


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


_FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Sampler(torch.nn.Module):
    """`fused` picks the path for batches the fused kernel can serve (see `takes_fused_path`):
    None (the default) uses it for CUDA logits when triton is installed, True for any device
    (on the CPU that needs TRITON_INTERPRET=1: the tests), False never."""

    def __init__(self, fused: bool | None = None) -> None:
        super().__init__()
        self.fused = fused
        # Philox keys of the fused path's unseeded rows. They are drawn on the host, so the step
        # touches no GPU random state and reads nothing back. The generator is seeded once from
        # torch's seed (torch.initial_seed, which does not advance the global generator), so
        # torch.manual_seed makes a run repeatable.
        self.key_generator = torch.Generator().manual_seed(torch.initial_seed())

    def takes_fused_path(self, logits: torch.Tensor, md: SamplingMetadata) -> bool:
        """The fused kernel does temperature and greedy only: no logprobs (they need the whole
        log-softmax), no min_tokens blocking, no penalties, no top-k / top-p / min-p."""
        if self.fused is False or (self.fused is None and not (logits.is_cuda and _triton_installed())):
            return False
        return (logits.dim() == 2 and logits.dtype in _FUSED_DTYPES
                and md.max_num_logprobs is None and not md.min_tokens and md.no_penalties
                and md.top_k is None and md.top_p is None and md.min_p is None
                # A seeded request draws from its own generator on every step, whatever else is
                # in its batch, so its tokens never depend on which path a step took.
                and not md.generators)

    def forward(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        if self.takes_fused_path(logits, md):
            return SamplerOutput(self.fused_sample(logits, md), None, None)
        logits = logits.to(torch.float32)
        # Logprobs describe the model's distribution, not the processed one (as vLLM v1).
        raw_logprobs = None if md.max_num_logprobs is None else logits.log_softmax(dim=-1)
        if md.min_tokens:
            logits = apply_min_tokens(logits, md.min_tokens)
        if not md.no_penalties:
            output_ids = to_device(pad_token_ids(md.output_token_ids, logits.shape[1]),
                                   torch.int64, logits.device)
            logits = apply_penalties(logits, md.prompt_token_ids, output_ids, md.presence_penalties,
                                     md.frequency_penalties, md.repetition_penalties)
        sampled = sample(logits, md)
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None)
        ids, lps = gather_logprobs(raw_logprobs, md.max_num_logprobs, sampled)
        return SamplerOutput(sampled, ids, lps)

    def fused_sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Greedy rows take the argmax, the others Gumbel-max with a fresh Philox key per row,
        drawn on the host."""
        from folovllm.sample import triton_sampler  # only here: `import folovllm` needs no triton

        keys = None if md.all_greedy else self.row_keys(logits.shape[0], logits.device)
        return triton_sampler.gumbel_sample(logits, md.temperature, keys, _GREEDY_EPS)

    def row_keys(self, n: int, device: torch.device) -> torch.Tensor:
        """[n] int64 Philox keys on `device`, built in pinned host memory and copied without
        blocking, so the step never waits for the GPU."""
        keys = torch.empty(n, dtype=torch.int64, pin_memory=device.type == "cuda")
        keys.random_(generator=self.key_generator)
        return keys.to(device, non_blocking=True)


def apply_min_tokens(logits: torch.Tensor, blocked: dict[int, set[int]]) -> torch.Tensor:
    vocab = logits.shape[1]
    pairs = [(row, tok) for row, toks in blocked.items() for tok in toks if tok < vocab]
    if not pairs:
        return logits
    rows, toks = to_device(pairs, torch.int64, logits.device).unbind(1)
    return logits.index_put((rows, toks), logits.new_full((), float("-inf")))


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, L] ids padded with vocab_size -> [n, vocab_size] occurrence counts."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.int64, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, prompt_token_ids: torch.Tensor, output_token_ids: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor) -> torch.Tensor:
    """vLLM semantics. Repetition (CTRL-style) covers prompt and output tokens; presence and
    frequency (OpenAI-style) cover output tokens only. Id tensors are padded with vocab size."""
    vocab = logits.shape[1]
    output_counts = token_counts(output_token_ids, vocab)
    seen = (token_counts(prompt_token_ids, vocab) > 0) | (output_counts > 0)
    rep = repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - frequency.unsqueeze(1) * output_counts
    return logits - presence.unsqueeze(1) * (output_counts > 0)


def sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    greedy = None if md.all_random else logits.argmax(dim=-1)
    if md.all_greedy:
        return greedy
    is_greedy = md.temperature < _GREEDY_EPS
    # Greedy rows get temperature 1 so the division stays finite; their sample is discarded.
    logits = logits / torch.where(is_greedy, 1.0, md.temperature).unsqueeze(1)
    if md.min_p is not None:
        logits = apply_min_p(logits, md.min_p)
    if md.top_k is not None or md.top_p is not None:
        logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
    sampled = exponential_race(logits.softmax(dim=-1), md.generators)
    return sampled if greedy is None else torch.where(is_greedy, greedy, sampled)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """One ascending sort serves both filters (as vLLM). Top-k keeps ties with the k-th logit.
    Top-p drops the low tail whose mass is <= 1 - top_p, i.e. keeps the smallest set reaching
    top_p; summing from the small end keeps top_p = 1 rows exact despite rounding."""
    sorted_logits, order = logits.sort(dim=-1)
    vocab = logits.shape[1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(0, vocab - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = tail_mass <= 1 - top_p.unsqueeze(1)
        drop[:, -1] = False  # the top token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(p / E), E ~ Exp(1), picks token i with probability p_i. Seeded rows draw E from their
    own generator, so their tokens do not depend on the rest of the batch. Zero-probability
    tokens score exactly 0 and never win (E is clamped away from 0 to avoid 0/0)."""
    noise = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        noise.exponential_()
    for row, gen in generators.items():
        noise[row].exponential_(generator=gen)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, k: int, sampled: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    top_lps, top_ids = logprobs.topk(k, dim=-1)
    sampled = sampled.unsqueeze(1)
    ids = torch.cat([sampled, top_ids], dim=1)
    return ids, torch.cat([logprobs.gather(1, sampled), top_lps], dim=1)
