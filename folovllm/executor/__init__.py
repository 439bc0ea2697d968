"""Executors: how the engine core reaches its workers (abstract.py has the interface)."""

from __future__ import annotations

from folovllm.config import EngineConfig
from folovllm.executor.abstract import Executor


def get_executor_class(config: EngineConfig) -> type[Executor]:
    """The executor for this configuration: one worker in this process for one device, or one
    worker process per tensor-parallel rank."""
    if config.parallel_config.world_size == 1:
        from folovllm.executor.uniproc import UniprocExecutor
        return UniprocExecutor
    from folovllm.executor.multiproc import MultiprocExecutor
    return MultiprocExecutor
