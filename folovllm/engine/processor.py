"""Prompts in: text, token ids or {"prompt_token_ids": [...]} -> a validated Request."""

from __future__ import annotations

import array
import copy
import operator
from typing import Any, Union

import numpy as np
import torch

from folovllm.config import ModelConfig
from folovllm.engine.tokenizer import eos_token_ids
from folovllm.request import Request
from folovllm.sampling_params import SamplingParams

PromptType = Union[str, list[int], dict[str, Any]]


def _is_bool(t) -> bool:
    return t is True or t is False or getattr(t, "dtype", None) in (torch.bool, np.bool_)


def _token_ids(ids) -> tuple[list[int], int, int]:
    """Token ids as plain ints, with the smallest and the largest; a float, a bool or a string
    among them is an error, not a guess. Integer scalars of other kinds (numpy integers, a
    one-element integer tensor) are taken as their value."""
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
    try:
        # The usual case, walked in C: only integers (objects with __index__) convert, and int64
        # holds every id a vocabulary has. A 2k-token prompt's ids checked one by one in Python,
        # or by their types and then min() and max(), cost 0.1-0.5 ms: most of the host time a
        # batch of prompts spends before its first step.
        packed = array.array("q", ids)
    except (TypeError, OverflowError):
        packed = None
    if packed is not None and packed:
        values = np.frombuffer(packed, dtype=np.int64)
        # True and False (and bool tensors) convert too, as 1 and 0: only ids of 0 or 1 can be one
        if not any(_is_bool(ids[i]) for i in np.flatnonzero(values <= 1).tolist()):
            return packed.tolist(), int(values.min()), int(values.max())
    out = []
    for i, t in enumerate(ids):   # the slow path names the first id that is not an integer
        if type(t) is not int:
            try:
                if _is_bool(t):
                    raise TypeError
                t = operator.index(t)
            except TypeError:
                raise ValueError(f"prompt token {i} is {t!r}; token ids must be ints") from None
        out.append(t)
    return out, min(out, default=0), max(out, default=-1)


def _cache_salt(prompt: PromptType) -> str | None:
    """A dict prompt's `cache_salt`: only requests with the same salt share prefix-cache blocks
    (so one tenant cannot probe another's prompts by timing)."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt


class Processor:
    def __init__(self, model_config: ModelConfig, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.vocab_size
        self.eos_token_ids = eos_token_ids(model_config, tokenizer)

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        text, ids, _, _ = self._tokenize(prompt)
        return text, ids

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int], int, int]:
        """(text, token ids, smallest id, largest id)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), *_token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs 'prompt' (text) or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model was loaded without a tokenizer, so prompts must be token ids "
                                 "({'prompt_token_ids': [...]}); or pass tokenizer=PATH")
            ids = self.tokenizer(prompt).input_ids
            return prompt, ids, min(ids, default=0), max(ids, default=-1)
        if isinstance(prompt, (list, tuple)):
            return None, *_token_ids(prompt)
        raise ValueError(f"a prompt must be text, a list of token ids or a dict, got {type(prompt).__name__}")

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams,
                arrival_time: float | None = None, fan_out: bool = False) -> Request:
        """A validated, tokenized Request. One with params.n > 1 is accepted only from a caller that
        fans it out into its n sequences (fan_out=True: EngineFrontend.process_request)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids, lo, hi = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, but max_model_len is {self.max_model_len}, "
                             "which leaves no room for output; shorten the prompt or raise max_model_len")
        if lo < 0 or hi >= self.vocab_size:
            bad = next(t for t in token_ids if not 0 <= t < self.vocab_size)
            raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {self.vocab_size})")
        # Each request owns its params: the engine adds this model's EOS ids to them.
        params = copy.copy(params)
        params.verify()  # fields may have been changed since construction
        if params.n > 1 and not fan_out:
            raise ValueError(f"SamplingParams.n must be 1 here, got {params.n}: this entry point runs one sequence "
                             "per request; send n requests with n=1 (and different seeds), or use LLM / LLMEngine")
        params.all_stop_token_ids = set(params.stop_token_ids)
        params.update_from_generation_config(self.eos_token_ids)
        return Request(request_id, token_ids, params, arrival_time, prompt=text, cache_salt=_cache_salt(prompt))

