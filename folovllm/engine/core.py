"""EngineCore: the scheduler, the executor and the step in flight.

    step = take queued adds/aborts -> schedule -> execute on the workers -> update the scheduler

Nothing above the core touches the scheduler or the executor. Requests arrive already validated
and tokenized (engine/processor.py); what leaves is one EngineCoreOutput per request per step:
new token ids, logprobs, and a finish reason once the request has ended. Detokenization and stop
strings happen above (engine/output_processor.py), which reports back through finish_requests.

The core may be stepped by a background thread while other threads add and abort requests:
add_request / abort_requests / finish_requests only put the change on a queue, which the
stepping thread applies at the start of its next step, so the scheduler is only ever touched by
one thread.
"""

from __future__ import annotations

import gc
import queue
import threading
import time
from dataclasses import dataclass, field

from folovllm.config import EngineConfig
from folovllm.core.sched.output import SchedulerOutput
from folovllm.core.sched.scheduler import EngineCoreOutput, Scheduler
from folovllm.executor import get_executor_class
from folovllm.executor.abstract import Executor
from folovllm.logger import init_logger
from folovllm.request import Request, RequestStatus

logger = init_logger(__name__)


@dataclass
class SchedulerStats:
    """What the scheduler looks like after a step, for metrics."""
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0           # since start-up
    prefix_cache_queries: int = 0      # tokens looked up, since start-up
    prefix_cache_hits: int = 0         # tokens found, since start-up


@dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput] = field(default_factory=list)
    # When each request was first scheduled (only those scheduled for the first time this step).
    first_scheduled: dict[str, float] = field(default_factory=dict)
    scheduler_stats: SchedulerStats | None = None


def freeze_startup_heap() -> float:
    """For a process that serves for long after its start-up (the engine-core process, the
    server): collect once, then move every object alive now to the collector's permanent
    generation (gc.freeze), so later full collections no longer walk the ~230k objects the
    model, the tokenizer and the libraries leave behind. Such a collection took 113-146 ms after
    the real model's start-up on CPU, a pause in every stream; frozen, under 0.1 ms. Returns the
    seconds it took."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.debug("%d start-up objects frozen out of garbage collection", gc.get_freeze_count())
    return time.perf_counter() - t0


class EngineCore:
    def __init__(self, config: EngineConfig, executor_class: type[Executor] | None = None) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.executor = (executor_class or get_executor_class(config))(config)
        num_blocks = self.executor.determine_num_blocks()
        config.cache_config.num_gpu_blocks = num_blocks
        self.executor.initialize_cache(num_blocks)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config)
        self.async_scheduling = bool(config.scheduler_config.async_scheduling)
        # (scheduler output, future) of the step on the device whose output is unread.
        self._in_flight: tuple[SchedulerOutput, object] | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._num_queued_adds = 0  # requests on the inbox not yet in the scheduler
        self._count_lock = threading.Lock()
        self._refused: list[EngineCoreOutput] = []  # adds the scheduler refused, reported next step
        self._seen: set[str] = set()  # requests scheduled at least once, until they finish
        self.startup_times = dict(self.executor.startup_times(), core=time.perf_counter() - t0)

    # ---- requests (any thread) ----------------------------------------------------------

    def add_request(self, request: Request) -> None:
        with self._count_lock:
            self._num_queued_adds += 1
        self._inbox.put(("add", request, None))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """End requests from outside the step: an abort, or a stop string found above."""
        if request_ids:
            self._inbox.put(("finish", list(request_ids), status))

    def has_unfinished_requests(self) -> bool:
        return self._num_queued_adds > 0 or self.scheduler.has_unfinished_requests()

    def has_work(self) -> bool:
        """Whether step() would do anything: requests to run or queued, a step in flight, or
        finished requests the workers have not yet heard of."""
        return (self.has_unfinished_requests() or self._in_flight is not None
                or bool(self.scheduler.finished_req_ids) or bool(self._refused) or not self._inbox.empty())

    def get_num_unfinished_requests(self) -> int:
        return self._num_queued_adds + self.scheduler.get_num_unfinished_requests()

    def process_inbox(self) -> None:
        """Apply the queued adds, aborts and finishes now. step() does this first; a caller that
        also steps the core (LLMEngine) calls it so that an abort frees its blocks at once. Only
        the thread that steps may call it."""
        while True:
            try:
                kind, what, status = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.scheduler.add_request(what)
                except ValueError as e:  # e.g. an id still in use: that request alone fails
                    logger.error("request %s refused: %s", what.request_id, e)
                    self._refused.append(EngineCoreOutput(what.request_id, [], finish_reason="error"))
                finally:
                    with self._count_lock:
                        self._num_queued_adds -= 1
            else:
                self.scheduler.finish_requests(what, status)

    # ---- the step (one thread) ----------------------------------------------------------

    def step(self) -> EngineCoreOutputs:
        """Schedule and run one step; return the per-request outputs of the step that finished.

        With async scheduling the step just scheduled is left running on the device and the
        outputs returned are those of the step before it, processed while the new one runs (so
        outputs arrive one step late, and a request ended by EOS or a stop string may have had
        one more row computed and discarded)."""
        self.process_inbox()
        if not (self.scheduler.has_unfinished_requests() or self._in_flight is not None
                or self.scheduler.finished_req_ids):
            refused, self._refused = self._refused, []
            return EngineCoreOutputs(refused, scheduler_stats=self.stats())  # nothing to run
        scheduler_output = self.scheduler.schedule()
        first = self._first_scheduled(scheduler_output)
        if not self.async_scheduling:
            outputs = self._update(scheduler_output, self.executor.execute_model(scheduler_output))
        else:
            future = None
            if scheduler_output.total_num_scheduled_tokens or scheduler_output.finished_req_ids:
                future = self.executor.execute_model(scheduler_output, non_block=True)
            previous, self._in_flight = self._in_flight, (scheduler_output, future) if future else None
            outputs = [] if previous is None else self._update(previous[0], previous[1].result())
        if self._refused:
            outputs, self._refused = self._refused + outputs, []
        return EngineCoreOutputs(outputs, first, self.stats())

    def _first_scheduled(self, scheduler_output: SchedulerOutput) -> dict[str, float]:
        now = time.monotonic()
        first = {}
        self._seen.difference_update(scheduler_output.finished_req_ids)  # first: an id may come back
        for req in scheduler_output.scheduled_new_reqs:
            if req.req_id not in self._seen:
                self._seen.add(req.req_id)
                first[req.req_id] = now
        return first

    def _update(self, scheduler_output: SchedulerOutput, runner_output) -> list[EngineCoreOutput]:
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def reset_prefix_cache(self) -> bool:
        """See Scheduler.reset_prefix_cache. Only the thread that steps may call it."""
        self.process_inbox()
        return self.scheduler.reset_prefix_cache()

    def stats(self) -> SchedulerStats:
        s = self.scheduler
        kv = s.kv_cache_manager
        return SchedulerStats(len(s.running), len(s.waiting), kv.usage, s.num_preemptions,
                              kv.num_cached_queries, kv.num_cached_hits)

    def shutdown(self) -> None:
        if self._in_flight is not None:
            self._in_flight[1].result()
            self._in_flight = None
        self.executor.shutdown()
