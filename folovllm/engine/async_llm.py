"""AsyncLLM: Processor + EngineCore + OutputProcessor with the core's loop in a background thread
and one async stream of RequestOutputs per request. The OpenAI server uses only this.

    event loop thread                         engine-core thread
    generate(): Processor -> Request  ---->   EngineCore inbox (thread-safe)
                                              loop: step() -> EngineCoreOutputs
    _on_core_outputs(): OutputProcessor <---  call_soon_threadsafe
      -> each request's asyncio.Queue
      -> stop strings / failures back to the core's inbox

The scheduler and the runner are touched only by the core thread; the tokenizer, detokenizers and
streams only by the event loop. Many clients share every step. A stream whose consumer goes away
(a client that disconnects) aborts its request, which frees its blocks at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator

from folovllm.config import EngineConfig
from folovllm.engine.core import EngineCoreOutputs, SchedulerStats
from folovllm.engine.frontend import EngineFrontend
from folovllm.engine.processor import PromptType
from folovllm.logger import init_logger
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import SamplingParams

logger = init_logger(__name__)


class EngineDeadError(RuntimeError):
    """The engine-core thread stopped on an error: no request can make progress."""


ENGINE_CORE_MODES = ("process", "thread")


class AsyncLLM(EngineFrontend):
    def __init__(self, config: EngineConfig, engine_core: str = "process") -> None:
        """engine_core: "process" (default) runs the core in a process of its own
        (engine/core_client.py); "thread" steps it from a thread of this process, sharing the
        GIL with the HTTP work (docs/serving.md has the measurements behind the default)."""
        if engine_core not in ENGINE_CORE_MODES:
            raise ValueError(f"engine_core must be one of {ENGINE_CORE_MODES}, got {engine_core!r}")
        t0 = time.perf_counter()
        self.engine_core_mode = engine_core
        super().__init__(config)
        self.scheduler_stats = SchedulerStats()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._counter = itertools.count()
        logger.info("async engine ready in %.1f s", time.perf_counter() - t0)

    @classmethod
    def from_engine_args(cls, engine_args, engine_core: str = "process") -> "AsyncLLM":
        return cls(engine_args.create_engine_config(), engine_core=engine_core)

    def _make_engine_core(self, config: EngineConfig):
        if self.engine_core_mode == "process":
            from folovllm.engine.core_client import EngineCoreProcClient
            return EngineCoreProcClient(config)
        return super()._make_engine_core(config)

    # ---- the engine-core thread ---------------------------------------------------------

    def _ensure_started(self) -> None:
        # Outputs go to the loop of the latest caller (a server has one loop for its life).
        self._loop = asyncio.get_running_loop()
        if self.engine_core_mode == "process":
            self.engine_core.start_output_thread(self._from_core_thread, self._core_died)
        elif self._thread is None:
            self._thread = threading.Thread(target=self._run_core, name="folovllm-engine-core", daemon=True)
            self._thread.start()
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped on an error: {self._dead!r}")

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine can no longer serve: its core loop stopped on an
        error, or (engine core in its own process) that process has exited, which is noticed
        here even when no request was running to hear of it."""
        if self._dead is None and self.engine_core_mode == "process" and not self.engine_core.is_alive():
            self._dead = RuntimeError(f"the engine-core process died (exit code {self.engine_core._exitcode()})")
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped on an error: {self._dead!r}")

    def _from_core_thread(self, outputs: EngineCoreOutputs) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_core_outputs, outputs)
        except RuntimeError:  # that loop has closed: nobody is listening any more
            pass

    def _core_died(self, error: BaseException) -> None:
        logger.error("%s", error)
        self._dead = error
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._fail_all, error)
            except RuntimeError:
                pass

    def _run_core(self) -> None:
        core = self.engine_core
        try:
            while not self._stop.is_set():
                self._wake.clear()
                if not core.has_work():
                    self._wake.wait(timeout=0.5)  # idle until a request arrives
                    continue
                self._from_core_thread(core.step())
        except BaseException as e:  # noqa: BLE001  every stream must hear of it
            logger.exception("the engine-core loop stopped")
            self._core_died(e)

    # ---- the event loop -------------------------------------------------------------------

    def _on_core_outputs(self, outputs: EngineCoreOutputs) -> None:
        self.scheduler_stats = outputs.scheduler_stats or self.scheduler_stats
        for out in self._process_core_outputs(outputs):
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
        self._wake.set()  # stop strings and failures may have queued work for an idle core

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError(f"the engine stopped on an error: {error!r}"))

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue one request and yield its outputs as they grow, the last one finished (with
        sampling_params.n > 1, each output holds the n sequences). Bad input raises ValueError
        before anything is queued. If the consumer stops early (a
        client disconnected, a task was cancelled), the request is aborted."""
        self._ensure_started()
        if request_id is None:
            request_id = f"req-{next(self._counter)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        # One core request, or n sequences for parallel sampling, merged back under request_id.
        core_requests = self.process_request(request_id, prompt, sampling_params or SamplingParams())
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        for request in core_requests:
            self.engine_core.add_request(request)
        self._wake.set()
        finished = False
        try:
            while True:
                out = await stream.get()
                # Outputs are cumulative, so when the consumer is behind (many streams, a busy
                # loop) only the newest matters: one event carries all the tokens since the last.
                while not isinstance(out, BaseException) and not out.finished and not stream.empty():
                    out = stream.get_nowait()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            del self._streams[request_id]
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str | list[str]) -> None:
        """End requests; a stream still being read gets a last output with finish_reason
        'abort'."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.engine_core.abort_requests(self.output_processor.core_request_ids(ids))
        for rid in ids:
            final = self.output_processor.abort(rid)
            stream = self._streams.get(rid)
            if stream is not None and final is not None:
                stream.put_nowait(final)
        self._wake.set()

    def encode(self, prompt: PromptType) -> list[int]:
        """A prompt's token ids as the engine would see them (validated the same way)."""
        return self.processor.tokenize(prompt)[1]

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Abort what is in flight and stop the core thread."""
        if self._streams:
            self.abort(list(self._streams))
        self._stop.set()
        self._wake.set()
        if self.engine_core_mode == "process":
            self.engine_core.shutdown(timeout)
            return
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.engine_core.shutdown()

