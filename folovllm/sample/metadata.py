"""Per-batch sampling tensors, built once per step on the host and shipped to the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from folovllm.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor | None     # [n] float32; None when all rows are greedy
    all_greedy: bool
    all_random: bool
    top_p: torch.Tensor | None           # [n] float32; None when no random row uses top-p (< 1)
    top_k: torch.Tensor | None           # [n] int64; None when unused; disabled rows hold vocab size
    min_p: torch.Tensor | None           # [n] float32; None when unused
    generators: dict[int, torch.Generator]  # row -> per-request generator (seeded requests)
    max_num_logprobs: int | None         # max SamplingParams.logprobs over rows; None if no row asks
    no_penalties: bool
    prompt_token_ids: torch.Tensor | None   # [n, max_prompt_len] int64 padded with vocab size
    output_token_ids: list[list[int]]       # generated tokens so far, per row
    presence_penalties: torch.Tensor | None
    frequency_penalties: torch.Tensor | None
    repetition_penalties: torch.Tensor | None
    min_tokens: dict[int, set[int]]     # rows still under min_tokens -> token ids to block


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor. Pinned staging makes the copy truly asynchronous, so building
    metadata never waits for the GPU to drain."""
    pin = torch.device(device).type == "cuda"
    return torch.tensor(data, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)


def pad_token_ids(rows: list[list[int]], pad: int) -> list[list[int]]:
    width = max((len(r) for r in rows), default=0)
    return [r + [pad] * (width - len(r)) for r in rows]


def build_sampling_metadata(params: list[SamplingParams], num_output_tokens: list[int],
                            generators: dict[int, torch.Generator], vocab_size: int, device: torch.device,
                            token_ids: Callable[[], tuple[list[list[int]], list[list[int]]]] | None = None,
                            ) -> SamplingMetadata:
    """`token_ids()` gives each row's (prompt ids, output ids); it is called only when a row uses
    penalties, so the common step never copies token histories."""
    greedy = [p.greedy for p in params]
    all_greedy, all_random = all(greedy), not any(greedy)
    # Greedy rows ignore the filters, so only random rows decide whether a filter tensor exists.
    random_params = [p for p, g in zip(params, greedy) if not g]

    def per_row(value, default, dtype):
        return to_device([default if g else value(p) for p, g in zip(params, greedy)], dtype, device)

    temperature = None if all_greedy else to_device([p.temperature for p in params], torch.float32, device)
    top_p = top_k = min_p = None
    if any(p.top_p < 1.0 for p in random_params):
        top_p = per_row(lambda p: p.top_p, 1.0, torch.float32)
    if any(0 < p.top_k < vocab_size for p in random_params):
        top_k = per_row(lambda p: min(p.top_k or vocab_size, vocab_size), vocab_size, torch.int64)
    if any(p.min_p > 0.0 for p in random_params):
        min_p = per_row(lambda p: p.min_p, 0.0, torch.float32)

    no_penalties = all(p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
                       and p.repetition_penalty == 1.0 for p in params)
    prompt_ids = presence = frequency = repetition = None
    output_token_ids: list[list[int]] = []
    if not no_penalties:
        if token_ids is None:
            raise ValueError("penalties need the rows' token ids: pass token_ids")
        prompt_token_ids, output_token_ids = token_ids()
        prompt_ids = to_device(pad_token_ids(prompt_token_ids, vocab_size), torch.int64, device)
        presence = to_device([p.presence_penalty for p in params], torch.float32, device)
        frequency = to_device([p.frequency_penalty for p in params], torch.float32, device)
        repetition = to_device([p.repetition_penalty for p in params], torch.float32, device)

    requested = [p.logprobs for p in params if p.logprobs is not None]
    min_tokens = {i: set(p.all_stop_token_ids) for i, p in enumerate(params)
                  if p.all_stop_token_ids and num_output_tokens[i] < p.min_tokens}

    return SamplingMetadata(
        temperature=temperature, all_greedy=all_greedy, all_random=all_random,
        top_p=top_p, top_k=top_k, min_p=min_p, generators=generators,
        max_num_logprobs=max(requested) if requested else None,
        no_penalties=no_penalties, prompt_token_ids=prompt_ids, output_token_ids=output_token_ids,
        presence_penalties=presence, frequency_penalties=frequency, repetition_penalties=repetition,
        min_tokens=min_tokens)
