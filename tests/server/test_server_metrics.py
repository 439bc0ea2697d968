"""/metrics in Prometheus text under vLLM's names, counters that move with the requests sent, and
clients that go away mid-request: their engine requests are aborted (they never finish, and the
running count and the KV cache drop to zero)."""

from __future__ import annotations

import threading
import time

import httpx

from server_support import MODEL_NAME, metric, scrape

NAMES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
         "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
         "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_success_total",
         "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
         "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count"]


def wait_idle(url: str, timeout: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:kv_cache_usage_perc") == 0 \
                and metric(m, "vllm:num_requests_waiting") == 0:
            return m
        assert time.monotonic() < deadline, {k: v for k, v in m.items() if "num_requests" in k or "kv_cache" in k}
        time.sleep(0.05)


def test_metric_names_and_counters(served):
    client = served.client()
    before = wait_idle(served.url)
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total"):
        assert any(k.startswith(name + "{") and f'model_name="{MODEL_NAME}"' in k for k in before), name
    prompts = ["abcdefghijklmnopqrstuvwx", "abcdefghijklmnopqrstuvwx", "zz"]
    num_prompt = 0
    for p in prompts:
        out = client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=3, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        num_prompt += out.usage.prompt_tokens
    for chunk in client.completions.create(model=MODEL_NAME, prompt="qq", max_tokens=3, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True}):
        pass
    num_prompt += len(served.tokenizer("qq").input_ids)
    after = wait_idle(served.url)
    assert all(any(k.partition("{")[0] == n for k in after) for n in NAMES), [
        n for n in NAMES if not any(k.partition("{")[0] == n for k in after)]

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("vllm:request_success_total", finished_reason="length") == 4
    assert delta("vllm:request_success_total") == 4
    assert delta("vllm:prompt_tokens_total") == num_prompt
    assert delta("vllm:generation_tokens_total") == 12
    for hist in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert delta(f"vllm:{hist}_seconds_count") == 4, hist
    assert delta("vllm:inter_token_latency_seconds_count") == 8  # 2 gaps in 3 tokens, 4 requests
    assert delta("vllm:e2e_request_latency_seconds_sum") > 0
    # The repeated prompt found its full blocks in the prefix cache.
    assert delta("vllm:prefix_cache_queries_total") >= 24 and delta("vllm:prefix_cache_hits_total") >= 16


def test_clients_dropping_mid_stream_abort_their_requests(served):
    before = wait_idle(served.url)
    got_chunks = []

    def drop(i):
        body = {"model": MODEL_NAME, "prompt": f"x{i}", "max_tokens": 400, "temperature": 0.0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as r:
            n = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    n += 1
                    if n == 3:
                        break
            got_chunks.append(n)

    threads = [threading.Thread(target=drop, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got_chunks == [3] * 20
    after = wait_idle(served.url, timeout=5)
    assert served.engine.num_unfinished_requests == 0
    # Aborted, not run to the end: none of them counts as finished.
    assert metric(after, "vllm:request_success_total") == metric(before, "vllm:request_success_total")


def test_non_streaming_client_that_leaves_aborts(served):
    before = wait_idle(served.url)
    body = {"model": MODEL_NAME, "prompt": "y", "max_tokens": 400, "temperature": 0.0, "ignore_eos": True}

    def leave(i):
        try:
            httpx.post(served.url + "/v1/completions", json={**body, "prompt": f"y{i}"}, timeout=0.3)
        except httpx.TimeoutException:
            pass

    threads = [threading.Thread(target=leave, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    after = wait_idle(served.url, timeout=5)
    assert served.engine.num_unfinished_requests == 0
    finished = metric(after, "vllm:request_success_total") - metric(before, "vllm:request_success_total")
    assert finished == 0, f"{finished} of 8 requests ran to the end after their clients left"
