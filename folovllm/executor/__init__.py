"""Executors: how the engine core reaches its workers (abstract.py has the interface)."""

from __future__ import annotations

import os

from folovllm.config import EngineConfig
from folovllm.executor.abstract import Executor


def get_executor_class(config: EngineConfig) -> type[Executor]:
    """The executor for this configuration: one worker in this process for one device, one
    worker process per tensor-parallel rank, or with FOLOVLLM_DISTRIBUTED=env this process as
    rank 0 of ranks the user started (RANK, WORLD_SIZE, ... in the environment)."""
    if os.environ.get("FOLOVLLM_DISTRIBUTED", "") == "env":
        # Ranks started by the user (any host): this process is rank 0 (executor/external.py).
        from folovllm.executor.external import ExternalRanksExecutor
        return ExternalRanksExecutor
    if config.parallel_config.world_size == 1:
        from folovllm.executor.uniproc import UniprocExecutor
        return UniprocExecutor
    from folovllm.executor.multiproc import MultiprocExecutor
    return MultiprocExecutor
