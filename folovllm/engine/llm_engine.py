"""LLMEngine: requests in, one step at a time, RequestOutputs out.

    step = schedule -> execute on the model runner -> update the scheduler -> detokenize
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

from folovllm.config import CacheConfig, EngineArgs, EngineConfig, ModelConfig, SchedulerConfig
from folovllm.core.sched.scheduler import Scheduler
from folovllm.engine.output_processor import OutputProcessor
from folovllm.engine.processor import Processor, PromptType
from folovllm.executor.uniproc import UniprocExecutor
from folovllm.model_executor.model_loader import load_format_of, load_hf_config
from folovllm.outputs import RequestOutput
from folovllm.request import RequestStatus
from folovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig | ModelConfig, scheduler_config: SchedulerConfig | None = None,
                 cache_config: CacheConfig | None = None, device: str | None = None, **engine_kwargs: Any) -> None:
        if isinstance(config, ModelConfig):
            config = EngineConfig(model_config=config, **engine_kwargs)
        elif engine_kwargs:
            raise TypeError(f"pass {sorted(engine_kwargs)} inside the EngineConfig")
        if scheduler_config is not None:
            config.scheduler_config = scheduler_config
        if cache_config is not None:
            config.cache_config = cache_config
        if device is not None:
            config.device = device
            config.__post_init__()
        self.config = config
        t0 = time.perf_counter()

        mc = config.model_config
        from folovllm.assets import resolve_model
        mc.model = resolve_model(mc.model)
        self.hf_config = load_hf_config(mc)
        self.max_model_len = self._max_model_len(mc, self.hf_config)
        config.scheduler_config.finalize(self.max_model_len)
        self.tokenizer = None if mc.skip_tokenizer_init else load_tokenizer(mc)

        self.executor = UniprocExecutor(config, self.hf_config, self.max_model_len)
        self.num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_cache(self.num_blocks)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, self.num_blocks, self.max_model_len)
        self.processor = Processor(self.tokenizer, self.max_model_len, self.hf_config.vocab_size,
                                   eos_token_ids(mc, self.hf_config, self.tokenizer))
        self.output_processor = OutputProcessor(self.tokenizer)
        sc = config.scheduler_config
        self.async_scheduling = (sc.async_scheduling if sc.async_scheduling is not None
                                 else config.torch_device().type == "cuda")
        # (scheduler output, runner handle) of the step on the device whose output is unread.
        self._in_flight: tuple | None = None
        self._request_counter = itertools.count()
        self.startup_times = dict(self.executor.worker.startup_times, total=time.perf_counter() - t0)
        logger.info("engine ready: %d KV blocks of %d tokens, max_model_len %d, start-up %s",
                    self.num_blocks, config.cache_config.block_size, self.max_model_len,
                    {k: round(v, 2) for k, v in self.startup_times.items()})

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLMEngine":
        return cls(engine_args.create_engine_config())

    @staticmethod
    def _max_model_len(mc: ModelConfig, hf_config) -> int:
        limit = getattr(hf_config, "max_position_embeddings", None)
        if mc.max_model_len is None:
            if limit is None:
                raise ValueError("the model config has no max_position_embeddings; pass max_model_len")
            return limit
        if limit is not None and mc.max_model_len > limit:
            raise ValueError(f"max_model_len ({mc.max_model_len}) is larger than the model's "
                             f"max_position_embeddings ({limit}); lower max_model_len")
        return mc.max_model_len

    # ---- requests ----------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None, stream: bool = True) -> str:
        """Queue a request. Bad input raises ValueError here, before the request touches any
        engine state, so the requests already queued carry on. With stream=False, step() returns
        the request's output only once it has finished."""
        if request_id is None:
            request_id = str(next(self._request_counter))
        if request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.processor.process(request_id, prompt, params or SamplingParams(), arrival_time)
        self.scheduler.add_request(request)
        self.output_processor.add_request(request, stream)
        return request_id

    def add_requests(self, prompts: list[PromptType],
                     params: SamplingParams | list[SamplingParams] | None = None,
                     stream: bool = False) -> list[str]:
        """Queue all prompts or none: if one is invalid, the ones already queued are withdrawn
        and the ValueError propagates."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.add_request(None, prompt, p, stream=stream))
        except ValueError:
            self.abort_request(ids)
            raise
        return ids

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        for req_id in ids:
            self.output_processor.abort(req_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    # ---- the step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; return the outputs of the step that finished.

        With async scheduling the step just scheduled is left running on the device and the
        outputs returned are those of the step before it, processed while the new one runs (so
        outputs arrive one step late, and a request ended by EOS or a stop string may have had
        one more row computed and discarded)."""
        scheduler_output = self.scheduler.schedule()
        now = time.monotonic()
        for req_id in scheduler_output.num_scheduled_tokens:
            state = self.output_processor.states.get(req_id)
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = now
        if not self.async_scheduling:
            return self._process(scheduler_output, self.executor.execute_model(scheduler_output))
        handle = self.executor.execute_model(scheduler_output, non_block=True)
        previous, self._in_flight = self._in_flight, (scheduler_output, handle)
        if previous is None:
            return []
        return self._process(previous[0], previous[1].get())

    def _process(self, scheduler_output, runner_output) -> list[RequestOutput]:
        core_outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        outputs, stopped = self.output_processor.process(core_outputs)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs

    # ---- the original plan's convenience API -----------------------------------------------

    def generate(self, prompt: PromptType, params: SamplingParams | None = None) -> RequestOutput:
        """One prompt to completion (other queued requests progress alongside)."""
        return next(iter(self.generate_batch([prompt], params).values()))

    def generate_batch(self, prompts: list[PromptType],
                       params: SamplingParams | list[SamplingParams] | None = None) -> dict[str, RequestOutput]:
        """All prompts together, continuously batched. Returns {request_id: final output} in
        prompt order."""
        ids = self.add_requests(prompts, params)
        final: dict[str, RequestOutput] = {}
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
        return {i: final[i] for i in ids}


def load_tokenizer(mc: ModelConfig):
    """transformers' tokenizer for the model (or the one a GGUF file carries). A folder with no
    tokenizer files gives None: the engine then runs on token ids."""
    from transformers import AutoTokenizer

    path = mc.tokenizer or mc.model
    if path.endswith(".gguf"):
        from folovllm.model_executor.model_loader.gguf_loader import load_gguf_tokenizer
        return load_gguf_tokenizer(path)
    if mc.tokenizer is None and not _has_tokenizer_files(Path(path)):
        logger.warning("%s has no tokenizer files: prompts must be token ids", path)
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=mc.trust_remote_code)


def _has_tokenizer_files(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((folder / n).exists() for n in names)


def eos_token_ids(mc: ModelConfig, hf_config, tokenizer) -> set[int]:
    """EOS ids as transformers' generate would use them: generation_config.json first, then the
    model config, then the tokenizer."""
    ids: Any = None
    if load_format_of(mc) != "gguf":
        gen = Path(mc.model) / "generation_config.json"
        if gen.exists():
            ids = json.loads(gen.read_text()).get("eos_token_id")
    if ids is None:
        ids = getattr(hf_config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {ids} if isinstance(ids, int) else set(ids)
