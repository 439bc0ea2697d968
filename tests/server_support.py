"""Fixtures and helpers of tests/server/ (loaded by tests/conftest.py as a plugin: a second
conftest.py would shadow the root one for `from conftest import ...`). The OpenAI server, really served: uvicorn on a free loopback port in a background thread, over
one AsyncLLM on the tiny qwen3 model with the character tokenizer, next to the offline LLM on the
same folder (the reference every answer is checked against).

The apps share the thread's event loop (an AsyncLLM belongs to one loop): `url` serves without
an API key and `key_url` the same engine behind KEY; `ids_url` serves the tiny llama of
tiny_models, which has no tokenizer files."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass

import pytest

# A chat template the character tokenizer can spell (it has no space token).
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
MODEL_NAME = "tiny"
KEY = "sekret-key"
MAX_BODY = 16 * 1024
ENGINE_KW = dict(device="cpu", max_num_seqs=16, max_num_batched_tokens=128, block_size=8, max_model_len=512,
                 enable_prefix_caching=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Several apps, each on its own port, served by one event loop in a daemon thread."""

    def __init__(self, apps) -> None:
        import uvicorn

        self.servers, self.ports = [], []
        for app in apps:
            port = free_port()
            config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                    timeout_graceful_shutdown=2)
            self.servers.append(uvicorn.Server(config))
            self.ports.append(port)
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        await asyncio.gather(*(s.serve() for s in self.servers))

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not all(s.started for s in self.servers):
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.should_exit = True
        self.thread.join(10)


@dataclass
class Served:
    url: str          # http://127.0.0.1:PORT (no API key)
    key_url: str      # the same engine behind KEY
    ids_url: str      # another engine, on a model without tokenizer files (token-id prompts only)
    engine: object    # AsyncLLM
    offline: object   # folovllm.LLM on the same model
    tokenizer: object
    path: str

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)


@pytest.fixture(scope="session")
def served(tiny_models_with_tokenizer, tiny_models):
    from folovllm import LLM
    from folovllm.engine.arg_utils import EngineArgs
    from folovllm.engine.async_llm import AsyncLLM
    from folovllm.entrypoints.openai.api_server import build_app

    path, _, tokenizer = tiny_models_with_tokenizer["qwen3"]
    engine = AsyncLLM.from_engine_args(EngineArgs(model=path, **ENGINE_KW))
    apps = [build_app(engine, MODEL_NAME, max_body_bytes=MAX_BODY, chat_template=CHAT_TEMPLATE),
            build_app(engine, MODEL_NAME, api_key=KEY, chat_template=CHAT_TEMPLATE)]
    ids_engine = AsyncLLM.from_engine_args(EngineArgs(model=tiny_models["llama"][0], **ENGINE_KW))
    apps.append(build_app(ids_engine, MODEL_NAME))
    thread = ServerThread(apps).start()
    offline = LLM(path, **ENGINE_KW)
    yield Served(*(f"http://127.0.0.1:{port}" for port in thread.ports), engine, offline, tokenizer, path)
    thread.stop()
    engine.shutdown()
    ids_engine.shutdown()


def scrape(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value} (labels as Prometheus writes them)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(values: dict[str, float], name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
    total = 0.0
    for key, v in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total
