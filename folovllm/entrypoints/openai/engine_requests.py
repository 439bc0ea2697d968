"""The engine requests behind one HTTP request: started together, read as one stream, and
aborted together when the client goes away or the server stops.

Each engine request is pumped by a task of its own onto a shared queue, so outputs of several
prompts interleave as they come; cancelling a pump (the consumer left, abort_all) stops its
`async for` over AsyncLLM.generate, which aborts the request in the engine."""

from __future__ import annotations

import asyncio
import contextlib

from folovllm.entrypoints.openai.errors import APIError, bad_value
from folovllm.entrypoints.openai.metrics import ServerMetrics
from folovllm.sampling_params import SamplingParams

_CANCELLED = "the request was cancelled (the server is shutting down)"


class EngineRequests:
    def __init__(self, engine, metrics: ServerMetrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.inflight: set[asyncio.Task] = set()

    def abort_all(self) -> None:
        for task in list(self.inflight):
            task.cancel()

    def _track(self, task: asyncio.Task) -> asyncio.Task:
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return task

    async def start(self, prompts: list, params: SamplingParams, base_id: str) -> list:
        """One engine request per prompt (`base_id-i`), each primed to its first output, so a
        bad prompt is a 400 before the response starts. Returns [(generator, first output)]."""
        started = []
        try:
            for i, prompt in enumerate(prompts):
                gen = self.engine.generate(prompt, params, f"{base_id}-{i}")
                try:
                    first = await gen.__anext__()
                except ValueError as e:
                    raise bad_value(e) from None
                started.append((gen, first))
        except BaseException:
            for gen, _ in started:
                await gen.aclose()
            raise
        return started

    async def _pump(self, i: int, gen, first, queue: asyncio.Queue) -> None:
        """Every output of one engine request onto `queue` as (i, output), an exception as
        (i, exception), and (i, None) at the end."""
        tracker = self.metrics.tracker()
        try:
            out = first
            tracker.update(out)
            queue.put_nowait((i, out))
            while not out.finished:
                out = await gen.__anext__()
                tracker.update(out)
                queue.put_nowait((i, out))
        except (Exception, asyncio.CancelledError) as e:
            queue.put_nowait((i, e))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            await gen.aclose()
            queue.put_nowait((i, None))

    async def outputs(self, started):
        """(index, output) as they come until every request has finished. A consumer that
        leaves early (or is cancelled) aborts what is left."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [self._track(asyncio.ensure_future(self._pump(i, gen, first, queue)))
                 for i, (gen, first) in enumerate(started)]
        remaining = len(tasks)
        try:
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, asyncio.CancelledError):
                    raise APIError(503, _CANCELLED)
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def final_outputs(self, request, started) -> list:
        """Every request's last output, in order. Polls the connection meanwhile: a client that
        disconnects aborts them all."""
        finals = [None] * len(started)

        async def run():
            async for i, out in self.outputs(started):
                if out.finished:
                    finals[i] = out

        task = self._track(asyncio.ensure_future(run()))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    raise APIError(400, "the client disconnected")
        finally:
            if not task.done():
                task.cancel()
        if task.cancelled():
            raise APIError(503, _CANCELLED)
        task.result()
        return finals
