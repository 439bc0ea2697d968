"""SamplingParams with vLLM's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
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
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:  # vLLM's older spelling of "no top-k"
            self.top_k = 0
        self._verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def bad(name: str, rule: str, value: object) -> ValueError:
            return ValueError(f"SamplingParams.{name} {rule}, got {value!r}")

        if self.n != 1:
            raise bad("n", "must be 1 (several completions per prompt are not supported yet; "
                      "submit the prompt several times with different seeds)", self.n)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]", self.presence_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]", self.frequency_penalty)
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "must be > 0", self.repetition_penalty)
        if not self.temperature >= 0.0:
            raise bad("temperature", "must be >= 0", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]", self.top_p)
        if self.top_k < 0:
            raise bad("top_k", "must be 0 or -1 (disabled) or >= 1", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]", self.min_p)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1", self.max_tokens)
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", "must be in [0, 20]", self.logprobs)
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "must hold non-empty strings", self.stop)
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must hold non-negative ints", self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def update_from_generation_config(self, eos_token_ids: set[int]) -> None:
        """Stop on the model's EOS ids unless ignore_eos; stop_token_ids always stop."""
        if not self.ignore_eos:
            self.all_stop_token_ids |= eos_token_ids
