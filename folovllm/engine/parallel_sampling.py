"""Parallel sampling (SamplingParams.n > 1), as vLLM v1 does it: the frontend fans a request out
into n child requests, the core runs them as ordinary sequences, and the OutputProcessor merges
their outputs back into one RequestOutput with n CompletionOutputs.

    fan_out:        Request(id, n=3) -> Requests "0_id", "1_id", "2_id" (n=1 each)
    core:           "0_id" computes the prompt; "1_id" and "2_id" start on its blocks
                    (Request.shares_prompt_with; KVCacheManager.fork: full blocks shared by
                    reference count, the last one copied before they write into it)
    ParentRequest:  the children's outputs -> RequestOutput(id, outputs=[index 0, 1, 2])
"""

from __future__ import annotations

import copy

from folovllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from folovllm.request import Request

_SEED_LIMIT = 2**64


def child_request_id(index: int, parent_id: str) -> str:
    return f"{index}_{parent_id}"


def fan_out(request: Request) -> list[Request]:
    """The n sequences of a request as requests of their own: the parent's prompt and sampling
    fields with n = 1, and with a seed, seed + i (mod 2**64) for sequence i, so that sequence 0
    samples exactly what an n=1 request with the same seed samples. Sequences 1.. are marked to
    start on sequence 0's prompt blocks rather than compute the prompt again."""
    params = request.sampling_params
    children: list[Request] = []
    for i in range(params.n):
        p = copy.copy(params)
        p.n, p.best_of = 1, None
        if params.seed is not None:
            p.seed = (params.seed + i) % _SEED_LIMIT
        p.all_stop_token_ids = set(params.all_stop_token_ids)
        children.append(Request(child_request_id(i, request.request_id), request.prompt_token_ids, p,
                                request.arrival_time, prompt=request.prompt, cache_salt=request.cache_salt,
                                shares_prompt_with=children[0].request_id if children else None))
    return children


class ParentRequest:
    """A request of n sequences as its caller sees it. Holds the newest CompletionOutput of each
    child (an empty one until the child has produced a token) and makes the merged RequestOutput:
    completion i is child i, and it is finished once every child is."""

    def __init__(self, request: Request, children: list[Request], stream: bool) -> None:
        self.request = request
        self.child_ids = [c.request_id for c in children]
        self.stream = stream
        self.completions = [CompletionOutput(index=i, text="", token_ids=[]) for i in range(len(children))]
        self.child_metrics: list[RequestMetrics] = []  # filled by the OutputProcessor, in index order
        self.num_finished = 0
        self.num_cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.child_ids)

    def update(self, index: int, out: RequestOutput) -> None:
        """A child's output (its one CompletionOutput, already carrying `index`)."""
        self.completions[index] = out.outputs[0]
        if out.finished:
            self.num_finished += 1
        if index == 0:  # sequence 0 computed the prompt: its hits are the request's
            self.num_cached_tokens = out.num_cached_tokens

    def output(self) -> RequestOutput:
        req = self.request
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, list(self.completions),
                             self.finished, self._metrics(), num_cached_tokens=self.num_cached_tokens)

    def _metrics(self) -> RequestMetrics:
        """The request's timings: the first child's first events, the last child's last ones."""
        ms = self.child_metrics

        def first(name):
            values = [getattr(m, name) for m in ms if getattr(m, name) is not None]
            return min(values) if values else None

        def last(name):
            values = [getattr(m, name) for m in ms if getattr(m, name) is not None]
            return max(values) if values else None

        return RequestMetrics(arrival_time=self.request.arrival_time,
                              first_scheduled_time=first("first_scheduled_time"),
                              first_token_time=first("first_token_time"),
                              last_token_time=last("last_token_time"),
                              finished_time=last("finished_time") if self.finished else None)
