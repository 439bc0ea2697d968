"""`folovllm bench serve` against a stand-in OpenAI-compatible server on 127.0.0.1 whose timing is
fixed by hand: the first text chunk after FIRST s, then one chunk every GAP s, usage in the last
chunk. The measured TTFT, ITL, TPOT and token counts must be those values, so the client's
arithmetic is checked against numbers derived by hand, not against its own output."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

pytest.importorskip("aiohttp")
starlette = pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from folovllm.bench import serve  # noqa: E402
from folovllm.entrypoints.cli import main  # noqa: E402

FIRST, GAP = 0.05, 0.02


def stand_in_app(seen: list[dict]) -> Starlette:
    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    async def completions(request):
        body = await request.json()
        seen.append(body)
        if body["max_tokens"] == 13:  # one request the test wants to fail
            return JSONResponse({"error": {"message": "nope", "type": "BadRequestError"}}, status_code=400)

        async def events():
            await asyncio.sleep(FIRST)
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(GAP)
                # 7 tokens: a server without a tokenizer, whose chunks carry token ids, no text
                choice = {"index": 0, "text": "", "token_ids": [i]} if body["max_tokens"] == 7 else \
                    {"index": 0, "text": "x"}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"],
                     "total_tokens": len(body["prompt"]) + body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture(scope="module")
def stand_in():
    seen: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(stand_in_app(seen), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(timeout=10)


def test_client_measures_the_stand_in_timing(stand_in):
    url, seen = stand_in
    seen.clear()
    reqs = [serve.BenchRequest([1, 2, 3], 5), serve.BenchRequest([4, 5], 8), serve.BenchRequest([6], 13),
            serve.BenchRequest([7], 7)]
    result = asyncio.run(serve.run_async(url, "stand-in", reqs, float("inf"), None, 0.0, 0, None, progress=False))
    assert (result["completed"], result["failed"]) == (3, 1)
    assert result["output_tokens"] == 5 + 8 + 7
    # Every token after a request's first is one inter-token gap, text or token ids alike.
    assert result["num_itl"] == 4 + 7 + 6
    assert "HTTP 400" in result["errors"][0]
    # Hand-derived: TTFT = FIRST, every later gap = GAP, TPOT = GAP, E2EL = FIRST + (n - 1) GAP.
    assert FIRST <= result["ttft_ms"]["median"] / 1e3 < FIRST + 0.04
    assert GAP * 0.9 <= result["itl_ms"]["median"] / 1e3 < GAP + 0.02
    assert GAP * 0.9 <= result["tpot_ms"]["mean"] / 1e3 < GAP + 0.02
    assert FIRST + 7 * GAP <= result["e2el_ms"]["p99"] / 1e3 < FIRST + 7 * GAP + 0.1
    # What any OpenAI-compatible server is sent: token ids, ignore_eos, a stream with usage.
    body = seen[0]
    assert body["prompt"] == [1, 2, 3] and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "stand-in"
    assert body["return_token_ids"] is True


def test_warmup_requests_are_sent_first_and_not_timed(stand_in):
    url, seen = stand_in
    seen.clear()
    reqs = [serve.BenchRequest([1, 2], 40), serve.BenchRequest([3], 30), serve.BenchRequest([4], 3)]
    result = asyncio.run(serve.run_async(url, "stand-in", reqs, float("inf"), None, 0.0, 0, None,
                                         progress=False, num_warmups=2))
    # The first two prompts again, capped at 16 tokens, before the timed three.
    assert [(b["prompt"], b["max_tokens"]) for b in seen[:2]] == [([1, 2], 16), ([3], 16)]
    assert [(b["prompt"], b["max_tokens"]) for b in seen[2:]] == [([1, 2], 40), ([3], 30), ([4], 3)]
    assert result["completed"] == 3 and result["output_tokens"] == 73


def test_poisson_arrivals_spread_the_requests(stand_in):
    """At 20 requests/s, 10 requests take about 9 / 20 s to send (the mean of 9 exponential gaps),
    far more than the all-at-once run; with a concurrency limit of 1 they run one after another."""
    url, _ = stand_in
    reqs = [serve.BenchRequest([1], 2) for _ in range(10)]
    burst = asyncio.run(serve.run_async(url, "stand-in", reqs, float("inf"), None, 0.0, 0, None, progress=False))
    paced = asyncio.run(serve.run_async(url, "stand-in", reqs, 20.0, None, 0.0, 0, None, progress=False))
    serial = asyncio.run(serve.run_async(url, "stand-in", reqs, float("inf"), 1, 0.0, 0, None, progress=False))
    one = FIRST + GAP
    assert burst["wall_s"] < 4 * one
    assert paced["wall_s"] > 0.15 and paced["completed"] == 10
    assert serial["wall_s"] >= 10 * one


def test_the_command_line_runs_the_workload(stand_in, tmp_path, capsys):
    url, seen = stand_in
    seen.clear()
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", url, "--num-prompts", "4", "--num-warmups", "0", "--input-len-range", "3,5",
               "--output-len-range", "2,3", "--no-progress", "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model"] == "stand-in" and result["completed"] == 4  # the model came from /v1/models
    assert all(3 <= len(b["prompt"]) <= 5 and 2 <= b["max_tokens"] <= 3 for b in seen)
    assert result["output_tokens"] == sum(b["max_tokens"] for b in seen)
    assert "serve: 4/4 requests" in capsys.readouterr().out
