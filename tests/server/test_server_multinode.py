"""`folovllm serve` as rank 0 of multi-node tensor parallelism (FOLOVLLM_DISTRIBUTED=env), on one
host: rank 1 is a `folovllm worker` process, rank 0 the server, both started by hand with the
env:// variables over gloo on CPU, as tests/integration/test_multinode.py starts an offline
engine. Greedy completions, streamed or not, give the tokens of the same model in one process;
SIGTERM ends the server and then the worker within seconds, leaving no process behind. A worker
killed in the middle of a stream ends that stream with an error naming its rank; killed while the
server is idle, or after either, every request gets a 500 that names it, and nothing hangs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_support import free_port
from test_server_sigterm import alive, children_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_multinode import FLAGS, PROMPTS, rank_env, stop, want  # noqa: E402,F401  want: a fixture

from folovllm.executor.multiproc import get_open_port  # noqa: E402

MODEL = "tiny-tp"
MAX_TOKENS = 10  # as test_multinode's `want`
START_S = 60


def start(path: str, flags: list[str], logs: Path):
    """(worker, server, url): rank 1 and rank 0, the server on a free port, once it answers. Their
    output goes to logs/worker.log and logs/server.log (files, not pipes: a server that logs
    tracebacks must never block on a full pipe)."""
    port, http_port = get_open_port(), free_port()
    common = ["--model", path, "--tensor-parallel-size", "2", "--device", "cpu", *flags]
    with open(logs / "worker.log", "w") as wlog, open(logs / "server.log", "w") as slog:
        worker = subprocess.Popen([sys.executable, "-m", "folovllm", "worker", *common], env=rank_env(1, port),
                                  stdout=wlog, stderr=subprocess.STDOUT)
        server = subprocess.Popen([sys.executable, "-m", "folovllm", "serve", *common, "--port", str(http_port),
                                   "--served-model-name", MODEL], env=rank_env(0, port),
                                  stdout=slog, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + START_S
    while True:
        if server.poll() is not None or worker.poll() is not None:
            stop(worker, server)
            raise AssertionError(f"a rank exited during start-up:\n{read_logs(logs)}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return worker, server, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop(worker, server)
            raise AssertionError("the server did not come up")
        time.sleep(0.1)


def read_logs(logs: Path) -> str:
    return "\n".join(f"--- {name}\n{(logs / name).read_text()}" for name in ("server.log", "worker.log"))


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def sigterm_and_wait(server, worker) -> tuple[float, list[int]]:
    """SIGTERM the server; (seconds until both ranks exited, the server's children still alive)."""
    kids = children_of(server.pid)
    t0 = time.monotonic()
    server.send_signal(signal.SIGTERM)
    server.wait(10)
    worker.wait(10)
    took = time.monotonic() - t0
    deadline = time.monotonic() + 5
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return took, [k for k in kids if alive(k)]


def test_serve_as_rank0_matches_one_process(tiny_models, want, tmp_path):
    path = tiny_models["qwen3"][0]
    worker, server, url = start(path, FLAGS, tmp_path)
    try:
        api = client(url)
        kw = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0.0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
        # The whole batch in one request (the prompts share steps), then each prompt streamed.
        full = api.completions.create(prompt=PROMPTS, **kw)
        assert [c.token_ids for c in sorted(full.choices, key=lambda c: c.index)] == want
        assert full.usage.completion_tokens == MAX_TOKENS * len(PROMPTS)
        for prompt, tokens in zip(PROMPTS, want):
            streamed = []
            for chunk in api.completions.create(prompt=prompt, stream=True, **kw):
                for c in chunk.choices:
                    streamed += c.token_ids
            assert streamed == tokens
        took, left = sigterm_and_wait(server, worker)
    finally:
        stop(worker, server)
    assert server.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), read_logs(tmp_path)
    assert worker.returncode == 0, read_logs(tmp_path)  # told to shut down, not left to find rank 0 gone
    assert took < 5, f"took {took:.1f} s to exit"
    assert not left, f"children left: {left}"
    print(f"SIGTERM: both ranks exited in {took:.2f} s")


@pytest.mark.parametrize("when", ["mid-stream", "idle"])
def test_worker_killed(tiny_models, when, tmp_path):
    """Rank 1 killed while a stream is running (that stream ends with an error event naming the
    rank), or while the server is idle; either way later requests get a 500 naming it, at once."""
    path = tiny_models["qwen3"][0]
    # A model length long enough that the stream is still running when rank 1 is killed; and no
    # --max-num-batched-tokens, so both ranks must take the same default budget from the same flags.
    flags = ["--max-model-len", "512", "--block-size", "8", "--max-num-seqs", "4"]
    worker, server, url = start(path, flags, tmp_path)
    try:
        named = f"tensor-parallel rank 1 (pid {worker.pid} "
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True, "stream": True}
        if when == "mid-stream":
            events, tokens = [], 0
            t0 = None
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    events.append(event)
                    if "choices" in event:
                        tokens += sum(len(c["token_ids"]) for c in event["choices"])
                    if t0 is None and tokens >= 3:
                        worker.kill()
                        t0 = time.monotonic()
            assert t0 is not None, events
            ended = time.monotonic() - t0
            assert tokens < 400, "the stream finished before rank 1 was killed"
            assert "error" in events[-1], events[-1]
            message = events[-1]["error"]["message"]
            assert named in message, message
            assert ended < 10, f"the stream took {ended:.1f} s to end"
            print(f"rank 1 killed: the stream ended after {ended:.2f} s with {message!r}")
        else:
            r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 3, "stream": False}, timeout=30)
            assert r.status_code == 200, r.text
            worker.kill()
        assert worker.wait(5) == -signal.SIGKILL
        # The engine cannot continue: requests fail at once, naming the rank, and do not hang.
        for stream in (False, True):
            r = httpx.post(url + "/v1/completions", json={**body, "stream": stream}, timeout=10)
            assert r.status_code == 500 and named in r.json()["error"]["message"], r.text
        took, left = sigterm_and_wait(server, worker)
    finally:
        stop(worker, server)
    assert server.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), read_logs(tmp_path)
    assert took < 5, f"took {took:.1f} s to exit"
    assert not left, f"children left: {left}"
