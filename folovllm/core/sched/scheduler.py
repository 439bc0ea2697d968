"""Continuous batching without phases: every request's num_computed_tokens chases its num_tokens.

Each step hands out a budget of max_num_batched_tokens tokens. Running requests come first (a
decode costs one token; a prompt being prefilled in chunks takes what the budget allows), then
waiting ones in arrival order while there is budget, room under max_num_seqs and free blocks.
When a running request cannot get a block, the newest running request is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed later.

A step that will sample a request's next token counts it as a placeholder until the token comes
back in update_from_output. With async scheduling the engine plans step N+1 while step N runs, so
a decoding request is scheduled for the position whose input is step N's (still unknown) token;
a request whose placeholder will end it (max_tokens, max_model_len) is not scheduled again, and
one that ends otherwise (EOS, a stop string) wastes one step's row, which is discarded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from folovllm.config import CacheConfig, SchedulerConfig
from folovllm.core.kv_cache_manager import KVCacheManager
from folovllm.core.sched.output import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                                        SchedulerOutput)
from folovllm.logger import init_logger
from folovllm.request import Request, RequestStatus

logger = init_logger(__name__)


@dataclass
class EngineCoreOutput:
    """One request's news from one step."""
    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0   # prompt tokens the prefix cache served


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        """Both configs resolved: the scheduler's finalized (token budget, max_model_len) and the
        cache's block count chosen (num_gpu_blocks)."""
        assert scheduler_config.max_model_len is not None, "call SchedulerConfig.finalize first"
        assert cache_config.num_gpu_blocks is not None, "the engine sets CacheConfig.num_gpu_blocks first"
        self.config = scheduler_config
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_model_len = scheduler_config.max_model_len
        self.block_size = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(cache_config.num_gpu_blocks, cache_config.block_size,
                                               cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0
        self.num_steps = 0

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """End requests from outside the step (abort, or a stop string the detokenizer found)."""
        assert RequestStatus.is_finished(status)
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free_request(request)

    def _free_request(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (say, after changing the weights). Refused (False) while any
        block is in use."""
        return self.kv_cache_manager.reset_prefix_cache()

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished_requests(self) -> bool:
        return self.get_num_unfinished_requests() > 0

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self.num_steps += 1
        token_budget = self.max_num_batched_tokens
        long_prefill = self.config.long_prefill_token_threshold
        num_scheduled_tokens: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: list[Request] = []

        # Running requests first.
        req_index = 0
        while req_index < len(self.running) and token_budget > 0:
            request = self.running[req_index]
            if request.num_output_placeholders and self._ends_with_placeholders(request):
                req_index += 1  # its last token is in flight: nothing more to compute
                continue
            num_new = min(request.num_tokens + request.num_output_placeholders - request.num_computed_tokens,
                          token_budget)
            if 0 < long_prefill < num_new:  # the next chunk of a long prompt, capped
                num_new = long_prefill
            assert num_new > 0, f"{request} is running with nothing to compute"
            while True:
                new_blocks = self.kv_cache_manager.allocate_slots(request, num_new)
                if new_blocks is not None:
                    break
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if new_blocks is None:  # it preempted itself
                break
            if new_blocks:  # the runner tracks progress itself; it only needs news of new blocks
                cached_reqs.append(CachedRequestData(request.request_id, False,
                                                     [b.block_id for b in new_blocks],
                                                     request.num_computed_tokens))
            num_scheduled_tokens[request.request_id] = num_new
            token_budget -= num_new
            req_index += 1

        # Then waiting ones, unless this step already had to take blocks back.
        copy_blocks: list[tuple[int, int]] = []
        if not preempted:
            # Siblings whose prompt a running sibling is still computing: the requests behind them
            # may go first, but not into the rows they will need.
            skipped: list[Request] = []
            while self.waiting and token_budget > 0 and len(self.running) + len(skipped) < self.max_num_seqs:
                request = self.waiting[0]
                if request.num_output_placeholders:
                    break  # preempted while its last token was in flight: wait for the token
                source = self._prompt_source(request)
                if source is not None:
                    if source.status != RequestStatus.RUNNING or source.num_computed_tokens < source.num_prompt_tokens:
                        skipped.append(self.waiting.popleft())
                        continue
                    copy = self.kv_cache_manager.fork(source, request)
                    if copy is None:
                        break
                    copy_blocks.append(copy)
                    num_cached, num_new = request.num_prompt_tokens - 1, 1
                else:
                    computed_blocks, num_cached = self.kv_cache_manager.get_computed_blocks(request)
                    num_new = request.num_tokens - num_cached
                    if 0 < long_prefill < num_new:
                        num_new = long_prefill
                    if num_new > token_budget:
                        if not self.config.enable_chunked_prefill:
                            break  # first come, first served: nobody overtakes it
                        num_new = token_budget
                    if self.kv_cache_manager.allocate_slots(request, num_new, computed_blocks) is None:
                        break
                    if self.kv_cache_manager.enable_caching:
                        self.kv_cache_manager.record_prefix_lookup(request.num_tokens, num_cached)
                request.num_computed_tokens = num_cached
                if request.num_cached_tokens is None:
                    request.num_cached_tokens = num_cached
                self.waiting.popleft()
                block_ids = self.kv_cache_manager.get_block_ids(request.request_id)
                if request.status == RequestStatus.PREEMPTED:
                    cached_reqs.append(CachedRequestData(request.request_id, True, block_ids, num_cached))
                else:
                    new_reqs.append(NewRequestData(request.request_id, list(request.prompt_token_ids),
                                                   request.sampling_params, block_ids, num_cached))
                if request.first_scheduled_step is None:
                    request.first_scheduled_step = self.num_steps
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                num_scheduled_tokens[request.request_id] = num_new
                token_budget -= num_new
            self.waiting.extendleft(reversed(skipped))

        # The runner computes these tokens now; count them as computed so that the next
        # schedule() sees where each request stands.
        # A request whose scheduled tokens reach its end samples one token this step.
        for req_id, num in num_scheduled_tokens.items():
            request = self.requests[req_id]
            request.num_computed_tokens += num
            if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1

        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled_tokens,
            total_num_scheduled_tokens=self.max_num_batched_tokens - token_budget,
            finished_req_ids=self.finished_req_ids,
            preempted_req_ids={r.request_id for r in preempted},
            copy_blocks=copy_blocks,
            step_id=self.num_steps,
        )
        self.finished_req_ids = set()
        return output

    def _prompt_source(self, request: Request) -> Request | None:
        """The sibling whose prompt blocks a never-scheduled request of parallel sampling starts
        on, while that sibling is unfinished. A request preempted since, or whose sibling ended
        first, computes its prompt itself (the prefix cache may still serve most of it)."""
        if request.shares_prompt_with is None or request.status != RequestStatus.WAITING:
            return None
        return self.requests.get(request.shares_prompt_with)

    def _ends_with_placeholders(self, request: Request) -> bool:
        """Whether the tokens in flight take the request to max_tokens or max_model_len."""
        n = request.num_output_placeholders
        return ((request.max_tokens is not None and request.num_output_tokens + n >= request.max_tokens)
                or request.num_tokens + n >= self.max_model_len)

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        stopped: list[Request] = []
        logprobs = runner_output.logprobs or [None] * len(runner_output.req_ids)
        for req_id, token_ids, req_logprobs in zip(runner_output.req_ids,
                                                   runner_output.sampled_token_ids, logprobs):
            request = self.requests.get(req_id)
            if request is None or not token_ids:
                continue  # ended meanwhile (abort, stop string), or a prompt chunk that samples nothing
            if request.first_scheduled_step is None or request.first_scheduled_step > scheduler_output.step_id:
                continue  # a new request under the id of one that ended while this step ran
            request.num_output_placeholders -= 1
            # A request preempted while this token was in flight keeps it: it was sampled from
            # a complete context, and the recompute will include it.
            new_token_ids = []
            try:
                for token_id in token_ids:
                    request.append_output_token_ids([token_id])
                    new_token_ids.append(token_id)
                    if self._check_stop(request, token_id):
                        stopped.append(request)
                        break
            except Exception:
                # One request's failure must not stall the batch: it alone ends, with an error.
                logger.exception("request %s failed in its stop check; ending it", req_id)
                request.status = RequestStatus.FINISHED_ERROR
                if request not in stopped:
                    stopped.append(request)
            outputs.append(EngineCoreOutput(
                req_id, new_token_ids, req_logprobs[:len(new_token_ids)] if req_logprobs else None,
                request.get_finished_reason(), request.stop_reason, request.num_cached_tokens or 0))
        for request in stopped:
            if request in self.running:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._free_request(request)
        return outputs

    def _check_stop(self, request: Request, token_id: int) -> bool:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens and token_id in params.all_stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
            return True
        if (request.max_tokens is not None and request.num_output_tokens >= request.max_tokens) \
                or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False
