"""GET /health says whether the engine can still serve: 200 while it can, 503 naming the cause once
its engine-core process has died, even when no request was running to notice it."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from server_support import ENGINE_KW, MODEL_NAME, ServerThread  # noqa: E402


def test_health_turns_503_when_the_engine_process_dies(tiny_models):
    from folovllm.engine.arg_utils import EngineArgs
    from folovllm.engine.async_llm import AsyncLLM
    from folovllm.entrypoints.openai.api_server import build_app

    engine = AsyncLLM.from_engine_args(EngineArgs(model=tiny_models["llama"][0], **ENGINE_KW))
    thread = ServerThread([build_app(engine, MODEL_NAME)]).start()
    url = f"http://127.0.0.1:{thread.ports[0]}"
    try:
        # No request yet: nothing is reading the engine's outputs, so only /health can notice.
        assert httpx.get(url + "/health", timeout=5).status_code == 200

        child = engine.engine_core.process
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        r = httpx.get(url + "/health", timeout=5)
        assert r.status_code == 503 and "died" in r.text and str(-signal.SIGKILL) in r.text
        # A request now fails at once with an error instead of waiting on a dead engine.
        body = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 2}
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code >= 500 and time.monotonic() - t0 < 10
        assert httpx.get(url + "/health", timeout=5).status_code == 503
    finally:
        thread.stop()
        engine.shutdown()
