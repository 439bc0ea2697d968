"""LLMEngine = Processor + EngineCore + OutputProcessor, stepped by its caller.

    add_request: prompt -> Processor (validate, tokenize) -> Request -> EngineCore
    step:        EngineCore.step() -> per-request token news -> OutputProcessor -> RequestOutputs

Every loop that drives the engine to completion goes through `iter_outputs` (requests already
queued: the command line) or `iter_batch` (a batch of prompts, queued slice by slice while the
engine runs: LLM.generate, generate_batch).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Generator, Iterator
from typing import Any

from folovllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from folovllm.engine.frontend import EngineFrontend
from folovllm.engine.processor import PromptType
from folovllm.logger import init_logger
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import SamplingParams

logger = init_logger(__name__)

# A batch run by iter_batch queues its prompts between steps, this many step budgets of prompt
# tokens at a time (chosen on the prefix workload of BENCHMARKS.md on an H200: all 64 prompts
# first, 48 ms to their first tokens; slices of 8, 16 and 32 prompts, 34, 33 and 38 ms).
BATCH_ADMIT_BUDGETS = 4


class LLMEngine(EngineFrontend):
    def __init__(self, config: EngineConfig | ModelConfig, scheduler_config: SchedulerConfig | None = None,
                 cache_config: CacheConfig | None = None, device: str | None = None, **engine_kwargs: Any) -> None:
        t0 = time.perf_counter()
        overrides = dict(engine_kwargs)
        if scheduler_config is not None:
            overrides["scheduler_config"] = scheduler_config
        if cache_config is not None:
            overrides["cache_config"] = cache_config
        if device is not None:
            overrides["device"] = device
        if isinstance(config, ModelConfig):
            config = EngineConfig(model_config=config, **overrides)
        elif overrides:
            import dataclasses
            config = dataclasses.replace(config, **overrides)  # resolved anew from what was asked
        super().__init__(config)
        self._request_counter = itertools.count()
        self.startup_times = dict(self.engine_core.startup_times, total=time.perf_counter() - t0)
        logger.info("engine ready in %.1f s: %d KV blocks of %d tokens, max_model_len %d, %s on %s",
                    self.startup_times["total"], config.cache_config.num_gpu_blocks,
                    config.cache_config.block_size, self.max_model_len, config.model_config.dtype,
                    config.torch_device())

    @classmethod
    def from_engine_args(cls, engine_args) -> "LLMEngine":
        return cls(engine_args.create_engine_config())

    @property
    def max_model_len(self) -> int:
        return self.model_config.max_model_len

    @property
    def async_scheduling(self) -> bool:
        return self.engine_core.async_scheduling

    # ---- requests ----------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None, stream: bool = True) -> str:
        """Queue a request. Bad input raises ValueError here, before the request touches any
        engine state, so the requests already queued carry on. With stream=False, step() returns
        the request's output only once it has finished. With params.n > 1 the core runs n
        sequences sharing the prompt, and each RequestOutput holds n CompletionOutputs."""
        if request_id is None:
            request_id = str(next(self._request_counter))
        self._queue(request_id, prompt, params, arrival_time, stream)
        return request_id

    def _queue(self, request_id: str, prompt: PromptType, params: SamplingParams | None,
               arrival_time: float | None, stream: bool) -> int:
        """add_request's work; returns the prompt tokens queued (n per prompt token for n > 1)."""
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        tokens = 0
        for request in self.process_request(request_id, prompt, params or SamplingParams(), arrival_time, stream):
            self.engine_core.add_request(request)
            tokens += request.num_prompt_tokens
        return tokens

    @staticmethod
    def _params_list(prompts: list[PromptType],
                     params: SamplingParams | list[SamplingParams] | None) -> list[SamplingParams]:
        params_list = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        return params_list

    def add_requests(self, prompts: list[PromptType],
                     params: SamplingParams | list[SamplingParams] | None = None,
                     stream: bool = False) -> list[str]:
        """Queue all prompts or none: if one is invalid, the ones already queued are withdrawn
        and the ValueError propagates."""
        params_list = self._params_list(prompts, params)
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.add_request(None, prompt, p, stream=stream))
        except Exception:
            self.abort_request(ids)
            raise
        return ids

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.engine_core.abort_requests(self.output_processor.core_request_ids(ids))
        self.engine_core.process_inbox()  # this caller also steps the core: free the blocks now
        for req_id in ids:
            self.output_processor.abort(req_id)

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.engine_core.get_num_unfinished_requests()

    # ---- the step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine-core step; the RequestOutputs it produced (see EngineCore.step for why,
        with async scheduling, they are those of the step before)."""
        outputs = self._process_core_outputs(self.engine_core.step())
        self.engine_core.process_inbox()  # this caller also steps the core: end them now
        return outputs

    def iter_outputs(self, request_ids: list[str]) -> Iterator[RequestOutput]:
        """Step until every request in request_ids has finished, yielding each output of theirs
        as it comes (the text so far of streamed requests, then each final one): the loop for
        requests already queued (iter_batch queues a batch as it goes). If the consumer stops
        early or raises, the requests still unfinished are aborted."""
        pending = set(request_ids)
        try:
            while pending:
                yield from self._step_outputs(pending)
        finally:
            if pending:
                self.abort_request(sorted(pending))

    def _step_outputs(self, pending: set[str]) -> Iterator[RequestOutput]:
        """One step's outputs of the requests in pending; the finished ones leave it."""
        for out in self.step():
            if out.request_id in pending:
                if out.finished:
                    pending.discard(out.request_id)
                yield out

    def iter_batch(self, prompts: list[PromptType], params: SamplingParams | list[SamplingParams] | None = None,
                   stream: bool = False) -> tuple[list[str], Generator[RequestOutput, None, None]]:
        """Run a batch of prompts to completion: their request ids (in prompt order) and an
        iterator of their outputs, as iter_outputs yields them.

        With async scheduling the prompts are queued while the engine runs: before each step,
        prompts are validated and queued until those queued since the step before hold
        BATCH_ADMIT_BUDGETS step budgets of prompt tokens (without it, all are queued first).
        Queuing everything first would put the whole batch's host work (validating, tokenizing,
        then hashing and looking up each prompt's blocks in the first step's scheduling) before
        the device's first step; this way the first step starts after a few budgets' worth of
        prompts, and each later slice is prepared while the device runs the step before it. A
        prompt that fails validation ends the whole batch: every request of it is aborted,
        running or not, and the ValueError propagates from the iterator (so, as with
        add_requests, a batch with a bad prompt returns no outputs)."""
        params_list = self._params_list(prompts, params)
        ids = [str(next(self._request_counter)) for _ in prompts]
        return ids, self._run_batch(ids, prompts, params_list, stream)

    def _run_batch(self, ids: list[str], prompts: list[PromptType], params_list: list[SamplingParams],
                   stream: bool) -> Generator[RequestOutput, None, None]:
        # Without async scheduling a step's host work cannot overlap the device's: queue all first.
        per_slice = (BATCH_ADMIT_BUDGETS * self.config.scheduler_config.max_num_batched_tokens
                     if self.async_scheduling else float("inf"))
        queued = 0
        pending: set[str] = set()
        try:
            while queued < len(ids) or pending:
                tokens = 0
                while queued < len(ids) and tokens < per_slice:
                    i = queued
                    tokens += self._queue(ids[i], prompts[i], params_list[i], None, stream)
                    pending.add(ids[i])
                    queued += 1
                yield from self._step_outputs(pending)
        finally:
            # a bad prompt, a failed step or a consumer that stopped early ends the whole batch
            if pending:
                self.abort_request(sorted(pending))

    # ---- the original plan's convenience API -----------------------------------------------

    def generate(self, prompt: PromptType, params: SamplingParams | None = None) -> RequestOutput:
        """One prompt to completion (other queued requests progress alongside)."""
        return next(iter(self.generate_batch([prompt], params).values()))

    def generate_batch(self, prompts: list[PromptType],
                       params: SamplingParams | list[SamplingParams] | None = None) -> dict[str, RequestOutput]:
        """All prompts together, continuously batched. Returns {request_id: final output} in
        prompt order."""
        ids, outputs = self.iter_batch(prompts, params)
        try:
            final = {out.request_id: out for out in outputs if out.finished}
        finally:
            outputs.close()  # an interrupted batch ends now, not when the generator is collected
        return {i: final[i] for i in ids}

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache; False (nothing done) while requests hold blocks."""
        return self.engine_core.reset_prefix_cache()

    def shutdown(self) -> None:
        self.engine_core.shutdown()
