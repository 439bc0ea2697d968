"""The one-device executor: a single worker in this process."""

from __future__ import annotations

from typing import Any

from folovllm.core.sched.output import SchedulerOutput
from folovllm.executor.abstract import Executor
from folovllm.worker.worker import Worker


class UniprocExecutor(Executor):
    def _init_executor(self) -> None:
        self.driver_worker = Worker(self.config, rank=0, local_rank=0)
        self.driver_worker.init_device()
        self.driver_worker.load_model()

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        return [getattr(self.driver_worker, method)(*args, **(kwargs or {}))]

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False):
        return self.driver_worker.execute_model(scheduler_output, non_block)
