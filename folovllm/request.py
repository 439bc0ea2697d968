"""A request as the scheduler sees it: token ids, progress, blocks, status."""

from __future__ import annotations

import enum
import time

from folovllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything after PREEMPTED is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    # Processing this request raised (a detokenizer, a stop check): it alone ends.
    FINISHED_ERROR = enum.auto()

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def finish_reason(status: "RequestStatus") -> str | None:
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One sequence. `num_computed_tokens` chases `num_tokens`: the scheduler gives each step
    some tokens of the difference, prompt and generated tokens alike."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 arrival_time: float | None = None, prompt: str | None = None,
                 cache_salt: str | None = None, shares_prompt_with: str | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens being sampled by steps still in flight (scheduled, output not yet back): with
        # async scheduling the next step is planned as if they were already known.
        self.num_output_placeholders = 0
        self.num_preemptions = 0
        # Prefix caching: only requests with the same salt share cached blocks; how many prompt
        # tokens the cache served when the request was first admitted.
        self.cache_salt = cache_salt
        self.num_cached_tokens: int | None = None
        # Parallel sampling: the id of the sibling (same prompt) that computes the prompt; this
        # request then starts on that sibling's blocks instead of computing it again.
        self.shares_prompt_with = shares_prompt_with
        # The scheduler step that first ran it (see SchedulerOutput.step_id).
        self.first_scheduled_step: int | None = None
        self.max_tokens = sampling_params.max_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finished_reason(self) -> str | None:
        return RequestStatus.finish_reason(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")
