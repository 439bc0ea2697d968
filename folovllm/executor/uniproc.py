"""Runs the one worker in this process. Tensor parallelism replaces this with an executor that
drives a worker per rank; the engine sees the same three calls."""

from __future__ import annotations

from folovllm.config import EngineConfig
from folovllm.core.sched.output import SchedulerOutput
from folovllm.worker.worker import Worker


class UniprocExecutor:
    def __init__(self, config: EngineConfig, hf_config, max_model_len: int) -> None:
        self.worker = Worker(config, hf_config, max_model_len)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False):
        """The step's ModelRunnerOutput, or with non_block=True a handle whose get() returns it."""
        return self.worker.execute_model(scheduler_output, non_block)
