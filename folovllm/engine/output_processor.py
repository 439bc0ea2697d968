"""Turns the scheduler's per-step token news into RequestOutputs: detokenizes incrementally,
finds stop strings, accumulates logprobs and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from folovllm.core.sched.scheduler import EngineCoreOutput
from folovllm.engine.detokenizer import IncrementalDetokenizer
from folovllm.engine.parallel_sampling import ParentRequest
from folovllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from folovllm.logger import init_logger
from folovllm.request import Request

logger = init_logger(__name__)


@dataclass
class RequestState:
    request: Request
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    # Streaming requests get an output every step; others only their final one, and are
    # detokenized only when they finish unless a stop string must be watched for each step.
    stream: bool = True
    output_token_ids: list[int] = field(default_factory=list)
    num_detokenized: int = 0
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    num_cached_tokens: int | None = None
    # A sequence of parallel sampling: its outputs go to the parent's merged RequestOutput, as
    # completion `index`.
    parent: ParentRequest | None = None
    index: int = 0


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)   # ended by a stop string
    failed: list[str] = field(default_factory=list)    # processing raised


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}   # by the core's request ids
        self.parents: dict[str, ParentRequest] = {}  # requests of n > 1 sequences, by their ids

    def has_request(self, request_id: str) -> bool:
        return request_id in self.states or request_id in self.parents

    def add_request(self, request: Request, stream: bool = True, children: list[Request] | None = None) -> None:
        """Track a request. With `children` (parallel sampling: engine/parallel_sampling.py) the
        core runs those, and their outputs are merged into one RequestOutput under the request's
        id. A request id (or a child's) already in use is a ValueError, before anything changes."""
        ids = [request.request_id] + [c.request_id for c in children or ()]
        used = next((i for i in ids if self.has_request(i)), None)
        if used is not None:
            raise ValueError(f"request id {used!r} is already in use")
        if not children:
            self.states[request.request_id] = self._new_state(request, stream)
            return
        parent = self.parents[request.request_id] = ParentRequest(request, children, stream)
        for i, child in enumerate(children):
            state = self.states[child.request_id] = self._new_state(child, stream, parent, i)
            parent.child_metrics.append(state.metrics)

    def _new_state(self, request: Request, stream: bool, parent: ParentRequest | None = None,
                   index: int = 0) -> RequestState:
        params = request.sampling_params
        return RequestState(
            request, IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params),
            RequestMetrics(arrival_time=request.arrival_time), stream,
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None, parent=parent, index=index)

    def core_request_ids(self, request_ids: list[str]) -> list[str]:
        """The ids the core knows these requests by: a request of n > 1 sequences is its children."""
        out = []
        for rid in request_ids:
            parent = self.parents.get(rid)
            out.extend(parent.child_ids if parent is not None else (rid,))
        return out

    def abort(self, request_id: str) -> RequestOutput | None:
        """Forget the request; its final output (finish_reason 'abort', the text so far; for n > 1
        sequences, those that had finished keep their own reason), or None if it was not here."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            state = self.states.pop(request_id, None)
            return None if state is None else self._aborted(state)
        for child_id in parent.child_ids:
            state = self.states.pop(child_id, None)
            if state is not None:
                parent.update(state.index, self._aborted(state))
        return parent.output()

    def _aborted(self, state: RequestState) -> RequestOutput:
        state.metrics.finished_time = time.monotonic()
        req = state.request
        completion = CompletionOutput(index=state.index, text=state.detokenizer.output_text,
                                      token_ids=list(state.output_token_ids), finish_reason="abort")
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion], True, state.metrics,
                             num_cached_tokens=state.num_cached_tokens)

    def process(self, core_outputs: list[EngineCoreOutput],
                first_scheduled: dict[str, float] | None = None) -> ProcessedOutputs:
        """The RequestOutputs of one step, and the requests the core must end: those a stop
        string ended, and those whose processing raised (each fails alone, finish_reason
        'error'; the rest of the batch carries on)."""
        now = time.monotonic()
        result = ProcessedOutputs()
        for req_id, t in (first_scheduled or {}).items():
            state = self.states.get(req_id)
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = t
        states = self.states
        parents: dict[str, ParentRequest] = {}  # those whose children had news this step
        for co in core_outputs:
            state = states.get(co.req_id)
            if state is None:
                continue
            try:
                # The common step of a request nobody watches: record its token and move on,
                # without a function call per request per step (host time in every decode step).
                metrics = state.metrics
                if metrics.first_token_time is None and co.new_token_ids:
                    metrics.first_token_time = now
                    state.num_cached_tokens = co.num_cached_tokens
                metrics.last_token_time = now
                state.output_token_ids.extend(co.new_token_ids)
                if state.logprobs is not None and co.new_logprobs:
                    for tok, lp in zip(co.new_token_ids, co.new_logprobs):
                        state.logprobs.append(lp)
                        state.cumulative_logprob += lp.get(tok, 0.0)
                if not (state.stream or co.finish_reason is not None or state.request.sampling_params.stop):
                    continue
                out = self._detokenize(state, co, now, result.stopped)
            except Exception:
                logger.exception("request %s failed in output processing; ending it", co.req_id)
                result.failed.append(co.req_id)
                out = self._finished_with_error(state, now)
            if out is not None:
                if state.parent is None:
                    result.outputs.append(out)
                else:
                    state.parent.update(state.index, out)
                    parents[state.parent.request.request_id] = state.parent
        for parent_id, parent in parents.items():
            if parent.finished:
                del self.parents[parent_id]
            if parent.stream or parent.finished:
                result.outputs.append(parent.output())
        return result

    def _finished_with_error(self, state: RequestState, now: float) -> RequestOutput:
        state.metrics.finished_time = now
        self.states.pop(state.request.request_id, None)
        req = state.request
        completion = CompletionOutput(index=state.index, text=state.detokenizer.output_text,
                                      token_ids=list(state.output_token_ids), finish_reason="error")
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion], True, state.metrics,
                             num_cached_tokens=state.num_cached_tokens)

    def _detokenize(self, state: RequestState, co: EngineCoreOutput, now: float,
                    stopped_by_string: list[str]) -> RequestOutput | None:
        """The new text, stop strings, and the RequestOutput if one is due."""
        metrics = state.metrics
        finish_reason, stop_reason = co.finish_reason, co.stop_reason
        stop_str = state.detokenizer.update(state.output_token_ids[state.num_detokenized:])
        state.num_detokenized = len(state.output_token_ids)
        if stop_str is None and finish_reason is not None:
            stop_str = state.detokenizer.finish()  # release text held back for a partial character
        if stop_str is not None:
            if finish_reason is None:
                stopped_by_string.append(co.req_id)
            finish_reason, stop_reason = "stop", stop_str
        finished = finish_reason is not None
        if not (state.stream or finished):
            return None
        if finished:
            metrics.finished_time = now
            del self.states[co.req_id]
        req = state.request
        completion = CompletionOutput(
            index=state.index, text=state.detokenizer.output_text, token_ids=list(state.output_token_ids),
            cumulative_logprob=state.cumulative_logprob,
            logprobs=None if state.logprobs is None else list(state.logprobs),
            finish_reason=finish_reason, stop_reason=stop_reason)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                             [completion], finished, metrics, num_cached_tokens=state.num_cached_tokens)
