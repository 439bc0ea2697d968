"""The server's Prometheus metrics, under vLLM's names with the `vllm:` prefix (so vLLM's
dashboards and scrapers work unchanged), each labelled with model_name.

Gauges and the engine's cumulative counters (preemptions, prefix-cache queries and hits) are
read from AsyncLLM.scheduler_stats at scrape time; token counts, finished requests and the
latency histograms are observed from each finished request's RequestOutput (and, for the
inter-token latency, the times its outputs reached the server). Every app has its own
CollectorRegistry, so a process (a test) can build several."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from folovllm.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineStatsCollector:
    """What the scheduler reports, read when scraped."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self):
        s = self.engine.scheduler_stats
        label = [self.model_name]
        for family, name, doc, value in (
                (GaugeMetricFamily, "vllm:num_requests_running", "Requests in the running batch.",
                 s.num_running_reqs),
                (GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting to be scheduled.",
                 s.num_waiting_reqs),
                (GaugeMetricFamily, "vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                 s.kv_cache_usage),
                (CounterMetricFamily, "vllm:num_preemptions", "Preemptions since start-up.", s.num_preemptions),
                (CounterMetricFamily, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 s.prefix_cache_queries),
                (CounterMetricFamily, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                 s.prefix_cache_hits)):
            metric = family(name, doc, labels=["model_name"])
            metric.add_metric(label, float(value))
            yield metric


class ServerMetrics:
    def __init__(self, engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineStatsCollector(engine, model_name))
        r, ml = self.registry, ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", ml, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", ml, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to the first token.", ml,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", ml,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", ml,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.", ml,
                               buckets=_LATENCY_BUCKETS, registry=r)
        # Every series exists from the start (at 0), so a scraper sees each name at once.
        for m in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e, self.queue):
            m.labels(model_name)
        for reason in ("stop", "length", "abort", "error"):
            self.request_success.labels(model_name, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> "RequestTracker":
        return RequestTracker(self)

    def observe_finished(self, out: RequestOutput) -> None:
        m, name = out.metrics, self.model_name
        self.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
        for completion in out.outputs:  # n sequences count as n finished requests, as in vLLM
            self.generation_tokens.labels(name).inc(len(completion.token_ids))
            self.request_success.labels(name, completion.finish_reason or "unknown").inc()
        if m is None:
            return
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(max(0.0, m.first_token_time - m.arrival_time))
        if m.first_scheduled_time is not None:
            self.queue.labels(name).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        end = m.finished_time if m.finished_time is not None else m.last_token_time
        if end is not None:
            self.e2e.labels(name).observe(max(0.0, end - m.arrival_time))


class RequestTracker:
    """Fed every RequestOutput of one engine request; the gaps between outputs, spread over the
    tokens each one brought, are the inter-token latencies (per sequence when n > 1)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.last_time: dict[int, float] = {}
        self.num_tokens: dict[int, int] = {}

    def update(self, out: RequestOutput) -> None:
        now = time.monotonic()
        for c in out.outputs:
            n = len(c.token_ids)
            new = n - self.num_tokens.get(c.index, 0)
            if new <= 0:
                continue
            last, gaps = self.last_time.get(c.index), new
            if last is None:  # the first output; if it brought several tokens (outputs merged
                # while the stream was behind), the rest came after the first token's time
                first = out.metrics.first_token_time if out.metrics is not None else None
                last, gaps = (first if first is not None else now), new - 1
            if gaps > 0:
                gap = max(0.0, now - last) / gaps
                hist = self.metrics.itl.labels(self.metrics.model_name)
                for _ in range(gaps):
                    hist.observe(gap)
            self.last_time[c.index], self.num_tokens[c.index] = now, n
        if out.finished:
            self.metrics.observe_finished(out)
