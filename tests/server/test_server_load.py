"""A bounded load test over loopback: `folovllm bench serve`'s client sends a few hundred
streamed token-id requests to the server, 64 at a time, and every one completes with exactly
the tokens it asked for; afterwards nothing is left running and every KV block is free."""

from __future__ import annotations

import asyncio
import time

from server_support import MODEL_NAME, metric, scrape

from folovllm.bench import serve


def test_a_few_hundred_requests_none_lost(served):
    requests = serve.serve_workload(240, (4, 40), (2, 8), seed=5, token_id_limit=300)
    t0 = time.monotonic()
    result = asyncio.run(asyncio.wait_for(
        serve.run_async(served.url, MODEL_NAME, requests, float("inf"), 64, 0.0, 0, None, progress=False),
        timeout=120))
    assert time.monotonic() - t0 < 120
    assert (result["completed"], result["failed"]) == (240, 0), result["errors"]
    assert result["output_tokens"] == sum(r.output_len for r in requests)
    for _ in range(50):
        values = scrape(served.url)
        if metric(values, "vllm:num_requests_running") == 0 and metric(values, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.1)
    assert metric(values, "vllm:num_requests_running") == 0
    assert metric(values, "vllm:kv_cache_usage_perc") == 0
