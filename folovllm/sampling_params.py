"""SamplingParams with vLLM's field names, defaults and meaning.

Every field is checked for type and range when the object is built, so a bad value is a
ValueError naming the field at the caller, never a crash inside a batched engine step that
would take the other requests down with it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

_GREEDY_EPS = 1e-5
# torch.Generator.manual_seed takes any 64-bit value; 2**64 and up overflow inside it. (On the
# CPU torch's mt19937 keeps only the low 32 bits, so the runner folds the high 32 into them there;
# CUDA's Philox generator uses all 64.)
_SEED_LIMIT = 2**64

_BOOL_FIELDS = ("ignore_eos", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
                "include_stop_str_in_output")
_FLOAT_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p")
_INT_FIELDS = ("n", "top_k", "min_tokens")
_OPTIONAL_INT_FIELDS = ("best_of", "max_tokens", "logprobs")


def _is_int(value: object) -> bool:
    # Integral covers numpy integers; bool is an int subclass but True is never meant as a count.
    # type() first: the common case costs no ABC check (verify runs once per request queued).
    return type(value) is int or (isinstance(value, Integral) and not isinstance(value, bool))


def _bad(name: str, rule: str, value: object) -> ValueError:
    return ValueError(f"SamplingParams.{name} {rule}, got {value!r}")


@dataclass
class SamplingParams:
    # n completions of one prompt (parallel sampling). The engine runs them as n sequences that
    # share the prompt's KV blocks; with a seed, sequence i samples with seed + i (mod 2**64), so
    # sequence 0 draws what an n=1 request with the same seed draws.
    n: int = 1
    # Accepted only as None or n: ranking best_of samples and returning the best n is not done.
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Filled by the engine from the tokenizer / generation config, not by the user.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    def verify(self) -> None:
        """Check every field and normalise it (stop to a list, numpy ints to int, top_k -1 to 0).
        Fields can be reassigned after construction, so the engine should call this again on
        its own copy before it queues a request (Processor.process)."""
        self._verify_types()
        if self.top_k == -1:  # vLLM's older spelling of "no top-k"
            self.top_k = 0
        self._verify_ranges()

    def _verify_types(self) -> None:
        """Check each field's type and store it as a plain Python value (numpy ints become int:
        torch.Generator.manual_seed and json both reject numpy scalars)."""
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise _bad(name, "must be True or False", value)
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if type(value) is float and math.isfinite(value):
                continue  # the common case, without ABC checks
            # NaN and inf pass or fail range checks by accident; reject them by name.
            try:
                finite = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
            except OverflowError:  # an int too large for a float
                finite = False
            if not finite:
                raise _bad(name, "must be a finite number", value)
            setattr(self, name, float(value))
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if type(value) is int:
                continue
            if not _is_int(value):
                raise _bad(name, "must be an int", value)
            setattr(self, name, int(value))
        for name in _OPTIONAL_INT_FIELDS:
            value = getattr(self, name)
            if value is None or type(value) is int:
                continue
            if not _is_int(value):
                raise _bad(name, "must be an int or None", value)
            setattr(self, name, int(value))
        if self.seed is not None:
            if not (_is_int(self.seed) and 0 <= self.seed < _SEED_LIMIT):
                raise _bad("seed", "must be None or an int in [0, 2**64)", self.seed)
            self.seed = int(self.seed)

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise _bad("stop", "must be a str or a list of non-empty str", self.stop)
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise _bad("stop", "must hold non-empty strings", self.stop)

        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)):
            raise _bad("stop_token_ids", "must be a list of ints", self.stop_token_ids)
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise _bad("stop_token_ids", "must hold non-negative ints", self.stop_token_ids)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    def _verify_ranges(self) -> None:
        """Range rules; the types are already right."""
        if self.n < 1:
            raise _bad("n", "must be >= 1", self.n)
        if self.best_of is not None and self.best_of != self.n:
            raise _bad("best_of", f"must be None or equal to n ({self.n}): returning the best n of best_of "
                       "samples is not supported; ask for n samples (with logprobs=0 each carries its "
                       "cumulative_logprob) and rank them yourself", self.best_of)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise _bad("presence_penalty", "must be in [-2, 2]", self.presence_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise _bad("frequency_penalty", "must be in [-2, 2]", self.frequency_penalty)
        if not self.repetition_penalty > 0.0:
            raise _bad("repetition_penalty", "must be > 0", self.repetition_penalty)
        if not self.temperature >= 0.0:
            raise _bad("temperature", "must be >= 0", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", "must be in (0, 1]", self.top_p)
        if self.top_k < 0:
            raise _bad("top_k", "must be 0 or -1 (disabled) or >= 1", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", "must be in [0, 1]", self.min_p)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _bad("max_tokens", "must be >= 1", self.max_tokens)
        if self.min_tokens < 0:
            raise _bad("min_tokens", "must be >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise _bad("logprobs", "must be in [0, 20]", self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def update_from_generation_config(self, eos_token_ids: set[int]) -> None:
        """Stop on the model's EOS ids unless ignore_eos; stop_token_ids always stop."""
        if not self.ignore_eos:
            self.all_stop_token_ids |= eos_token_ids
