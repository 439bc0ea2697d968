"""Executors: how the engine core reaches its workers (abstract.py has the interface)."""

from __future__ import annotations

from folovllm.config import EngineConfig
from folovllm.executor.abstract import Executor


def get_executor_class(config: EngineConfig) -> type[Executor]:
    """The executor for this configuration: one worker in this process for one device."""
    tp = config.parallel_config.tensor_parallel_size
    if tp == 1:
        from folovllm.executor.uniproc import UniprocExecutor
        return UniprocExecutor
    raise ValueError(f"tensor_parallel_size={tp} needs the multi-process executor, which this version "
                     "does not have yet; use tensor_parallel_size=1")
