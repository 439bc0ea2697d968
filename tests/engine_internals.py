"""The one place where tests reach inside the engine.

Tests drive the engine through its public API (LLM, LLMEngine, SamplingParams, RequestOutput) and
come here only for what that API does not show: the scheduler, the KV block pool, the model
runner. Two layouts are understood:

    before the EngineCore refactor                 after it
    LLM.llm_engine                 -> LLMEngine    LLM.llm_engine
    LLMEngine.scheduler                            LLMEngine.engine_core.scheduler
    LLMEngine.executor.worker.model_runner         LLMEngine.engine_core.executor.driver_worker.model_runner

so that when internals move again only this file changes. Every function takes an LLM or an
LLMEngine.
"""

from __future__ import annotations

import contextlib


def engine_of(llm_or_engine):
    return getattr(llm_or_engine, "llm_engine", llm_or_engine)


def _core(llm_or_engine):
    """What holds the scheduler and the executor: the EngineCore, or the engine itself."""
    engine = engine_of(llm_or_engine)
    return getattr(engine, "engine_core", engine)


def scheduler_of(llm_or_engine):
    return _core(llm_or_engine).scheduler


def block_pool_of(llm_or_engine):
    return scheduler_of(llm_or_engine).kv_cache_manager.block_pool


def runner_of(llm_or_engine):
    executor = _core(llm_or_engine).executor
    worker = getattr(executor, "driver_worker", None) or executor.worker
    return worker.model_runner


def num_kv_blocks(llm_or_engine) -> int:
    """Blocks in the KV pool (what the memory sizing decided)."""
    return block_pool_of(llm_or_engine).num_blocks


def num_free_kv_blocks(llm_or_engine) -> int:
    return block_pool_of(llm_or_engine).get_num_free_blocks()


def kv_cache_tensors(llm_or_engine) -> list:
    """The KV-cache tensors, one per attention layer."""
    return [layer.kv_cache for layer in runner_of(llm_or_engine).attn_layers]


def runner_request_ids(llm_or_engine) -> set[str]:
    """Requests whose state the model runner still holds."""
    return set(runner_of(llm_or_engine).input_batch.req_id_to_index)


def scheduler_request_ids(llm_or_engine) -> set[str]:
    return set(scheduler_of(llm_or_engine).requests)


def assert_all_blocks_free(llm_or_engine) -> None:
    free, total = num_free_kv_blocks(llm_or_engine), num_kv_blocks(llm_or_engine)
    held = scheduler_request_ids(llm_or_engine)
    assert free == total, f"{total - free} of {total} KV blocks still held (scheduler requests: {held})"


def assert_idle(llm_or_engine) -> None:
    """Nothing left anywhere once every request has finished: no request in the scheduler, every
    KV block free, and -- after one more step, which is when the runner hears of the last finished
    requests -- no request in the runner."""
    engine = engine_of(llm_or_engine)
    assert not engine.has_unfinished_requests()
    assert not scheduler_request_ids(engine)
    assert_all_blocks_free(engine)
    engine.step()
    assert not runner_request_ids(engine)
    assert_all_blocks_free(engine)


@contextlib.contextmanager
def recording_graph_replays(llm_or_engine):
    """Record every CUDA-graph replay of the runner: yields a list that gets, per replay, a dict
    with the graph's key (pure decode?, padded size, padded request count, longest context), the request rows the graph saw
    (query_start_loc, seq_lens as host lists) and whether its whole hidden-state output is finite."""
    import torch

    runner = runner_of(llm_or_engine)
    records: list[dict] = []
    graphs = runner.graphs

    class Recorded:
        def __init__(self, key, graph):
            self.key, self.graph = key, graph

        def replay(self):
            decode, size, num_reqs, _ = self.key
            qsl = runner.query_start_loc[:num_reqs + 1].tolist()
            seq_lens = runner.seq_lens[:num_reqs].tolist()
            self.graph.replay()
            torch.cuda.synchronize()
            hidden = runner.graph_hidden[:size]
            records.append(dict(key=self.key, query_start_loc=qsl, seq_lens=seq_lens,
                                finite=bool(torch.isfinite(hidden).all())))

    runner.graphs = {k: Recorded(k, g) for k, g in graphs.items()}
    try:
        yield records
    finally:
        runner.graphs = graphs


def block_ids_of(llm_or_engine, request_id: str) -> list[int]:
    """The KV blocks a request holds (a request of n > 1 sequences: pass a sequence's id)."""
    return scheduler_of(llm_or_engine).kv_cache_manager.get_block_ids(request_id)


def block_ref_counts(llm_or_engine) -> list[int]:
    return [b.ref_cnt for b in block_pool_of(llm_or_engine).blocks]


def prefix_cache_counters(llm_or_engine) -> tuple[int, int]:
    """(prompt tokens looked up, tokens found) since start-up, as the server's metrics read them."""
    stats = _core(llm_or_engine).stats()
    return stats.prefix_cache_queries, stats.prefix_cache_hits


def cached_prefix_tokens(llm_or_engine, prompt_token_ids: list[int], cache_salt: str | None = None) -> int:
    """How many tokens of this prompt the prefix cache would serve now (a lookup that allocates
    nothing)."""
    from folovllm.request import Request
    from folovllm.sampling_params import SamplingParams

    kv = scheduler_of(llm_or_engine).kv_cache_manager
    probe = Request("probe", prompt_token_ids, SamplingParams(), cache_salt=cache_salt)
    try:
        return kv.get_computed_blocks(probe)[1]
    finally:
        kv.req_to_block_hashes.pop("probe", None)


@contextlib.contextmanager
def recording_schedules(llm_or_engine):
    """Yields a list that gets every SchedulerOutput the scheduler makes meanwhile."""
    scheduler = scheduler_of(llm_or_engine)
    inner, records = scheduler.schedule, []

    def schedule():
        records.append(inner())
        return records[-1]

    scheduler.schedule = schedule
    try:
        yield records
    finally:
        del scheduler.schedule  # the class's method again
