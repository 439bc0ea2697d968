"""What the scheduler tells the model runner, and what the runner answers. These two types are
the only thing the scheduler and the runner share."""

from __future__ import annotations

from dataclasses import dataclass, field

from folovllm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen: everything it needs to keep its own copy."""
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds that got new blocks (a running request that did not is
    absent: the runner advances num_computed_tokens itself). A request resumed after preemption
    gets its whole (new) block list and restarts from num_computed_tokens."""
    req_id: str
    resumed_from_preemption: bool
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    # req_id -> tokens to compute this step, in batch order.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests that ended since the last step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    # Requests preempted this step: they keep their runner state, and will be recomputed.
    preempted_req_ids: set[str] = field(default_factory=set)
    # (source, destination) KV-block ids to copy, in every layer, before this step's forward pass:
    # a request that shares a sibling's prompt blocks gets its own copy of the one it writes into.
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)
    # The scheduler's count of steps: a request first scheduled after this step cannot take its
    # tokens (a new request that reuses a finished one's id while that one's last row is in flight).
    step_id: int = 0

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]
    # Per request in req_ids: the tokens sampled this step (empty while a prompt is still being
    # prefilled in chunks).
    sampled_token_ids: list[list[int]]
    # Per request: one dict per sampled token, token id -> logprob (sampled token and top N), or None.
    logprobs: list[list[dict[int, float]] | None] | None = None
