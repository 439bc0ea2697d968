"""The executor interface: how the engine core reaches the workers.

An executor owns one worker per rank. The core calls only the methods below; each is a
collective call (`collective_rpc`) that every worker runs, so a multi-process executor (one
process per tensor-parallel rank) implements the same interface by sending the call to each
process. Only the driver worker (rank 0) returns sampled tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

from folovllm.config import EngineConfig
from folovllm.core.sched.output import ModelRunnerOutput, SchedulerOutput


class FutureOutput(Protocol):
    """A step still running on the device: result() waits for it and returns its output."""

    def result(self) -> ModelRunnerOutput: ...


class Executor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._init_executor()

    @abstractmethod
    def _init_executor(self) -> None:
        """Start the workers: device, distributed group, model weights."""

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        """Run `method` on every worker; one result per rank, in rank order."""

    def determine_num_blocks(self) -> int:
        """Each rank sizes its own KV cache; all ranks must hold the same block count, so the
        smallest wins."""
        return min(self.collective_rpc("determine_num_blocks"))

    def initialize_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", (num_blocks,))

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput,
                      non_block: bool = False) -> ModelRunnerOutput | FutureOutput:
        """Run one step on every worker. Returns the driver's output, or with non_block=True a
        future whose result() waits for it."""

    def startup_times(self) -> dict[str, float]:
        """Seconds each start-up phase took on the driver worker."""
        return self.collective_rpc("get_startup_times")[0]

    def shutdown(self) -> None:
        """Stop the workers (a no-op in-process)."""
