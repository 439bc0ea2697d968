"""The serve workload (BENCHMARKS.md): requests sent to an OpenAI-compatible server with Poisson
arrivals, each a streamed /v1/completions call with a token-id prompt and ignore_eos, so any such
server (FoloVLLM's, vLLM's) can be measured the same way.

Per request: TTFT (send -> first text chunk), ITL (gaps between later chunks), TPOT ((E2EL -
TTFT) / (output tokens - 1)), E2EL (send -> last chunk); output tokens from the server's usage.
Reported: mean, median and p99 of each, request and output-token throughput over the wall time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from folovllm.bench.workloads import BenchRequest, random_prompts


def serve_workload(num_prompts: int = 500, input_len_range: tuple[int, int] = (100, 1024),
                   output_len_range: tuple[int, int] = (100, 512), seed: int = 0,
                   token_id_limit: int = 10_000) -> list[BenchRequest]:
    """Prompt and output lengths uniform in their ranges (inclusive), random token ids."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_len_range[0], input_len_range[1] + 1, num_prompts)
    out_lens = rng.integers(output_len_range[0], output_len_range[1] + 1, num_prompts)
    return [BenchRequest(random_prompts(1, int(n), rng, token_id_limit)[0], int(m))
            for n, m in zip(in_lens, out_lens)]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    out = dict(num_requests=len(results), completed=len(ok), failed=len(results) - len(ok), wall_s=wall,
               request_throughput=len(ok) / wall if wall else 0.0,
               output_tokens=sum(r.output_tokens for r in ok))
    out["output_tokens_per_s"] = out["output_tokens"] / wall if wall else 0.0
    series = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
              "itl": [g for r in ok for g in r.itl], "e2el": [r.e2el for r in ok]}
    for name, values in series.items():
        out[f"{name}_ms"] = dict(mean=1e3 * statistics.fmean(values) if values else float("nan"),
                                 median=1e3 * percentile(values, 50), p99=1e3 * percentile(values, 99))
    out["num_itl"] = len(series["itl"])
    out["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return out


async def send_one(session, url: str, model: str, req: BenchRequest, temperature: float) -> RequestResult:
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "ignore_eos": True,
            "temperature": temperature, "stream": True, "stream_options": {"include_usage": True},
            # vLLM's extra, so that tokens are seen arriving even where the server has no tokenizer
            # (dummy weights); servers without it ignore the field and send text.
            "return_token_ids": True}
    t0 = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return result
            async for line in resp.content:  # one server-sent-event line at a time
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") or c.get("token_ids") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - t0
                    else:
                        result.itl.append(now - last)
                    last = now
    except Exception as e:  # noqa: BLE001  a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2el = (last or time.perf_counter()) - t0
    result.ok = last is not None
    if not result.ok:
        result.error = "no text came back"
    return result


async def run_async(base_url: str, model: str, requests: list[BenchRequest], request_rate: float,
                    max_concurrency: int | None, temperature: float, seed: int, api_key: str | None,
                    progress: bool = True, num_warmups: int = 0) -> dict:
    """The client runs on aiohttp: at tens of thousands of streamed tokens per second a slower
    client becomes the bottleneck being measured (bench serve's own CPU time is worth checking
    next to the server's; benchmarks/serve_comparison.sh records both)."""
    import aiohttp
    from tqdm.auto import tqdm

    url = base_url.rstrip("/") + "/v1/completions"
    rng = np.random.default_rng(seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    bar = tqdm(total=len(requests), desc="Requests", disable=not progress, dynamic_ncols=True)
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers,
                                     read_bufsize=2 ** 20) as session:
        async def one(req: BenchRequest) -> RequestResult:
            if gate is None:
                r = await send_one(session, url, model, req, temperature)
            else:
                async with gate:
                    r = await send_one(session, url, model, req, temperature)
            bar.update(1)
            return r

        # Untimed warm-up: a few of the workload's prompts with short outputs, so that the server's
        # first-step costs (allocator pools, kernel caches) stay out of the figures.
        warm = [BenchRequest(r.prompt_token_ids, min(r.output_len, 16)) for r in requests[:num_warmups]]
        if warm:
            await asyncio.gather(*(send_one(session, url, model, r, temperature) for r in warm))
        tasks = []
        t0 = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    bar.close()
    return summarize(list(results), wall)


def model_of(base_url: str, api_key: str | None) -> str:
    """The first model the server lists (what --model defaults to)."""
    import urllib.request

    req = urllib.request.Request(base_url.rstrip("/") + "/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def report(result: dict) -> str:
    lines = [f"serve: {result['completed']}/{result['num_requests']} requests in {result['wall_s']:.2f} s "
             f"({result['failed']} failed) | {result['request_throughput']:.2f} req/s | "
             f"{result['output_tokens_per_s']:,.0f} output tok/s"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        m = result[f"{name}_ms"]
        lines.append(f"  {name.upper():<5} mean {m['mean']:9.2f} ms | median {m['median']:9.2f} ms | "
                     f"p99 {m['p99']:9.2f} ms")
    lines += [f"  error: {e}" for e in result["errors"]]
    return "\n".join(lines)
