"""Settings `folovllm serve` resolves differently from the offline engine."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from folovllm.engine.arg_utils import from_cli_args  # noqa: E402
from folovllm.entrypoints.cli import build_parser  # noqa: E402
from folovllm.entrypoints.openai.api_server import SERVER_MAX_NUM_BATCHED_TOKENS, apply_server_defaults  # noqa: E402


def budget(argv: list[str], serve: bool) -> int:
    ns = build_parser().parse_args(argv)
    if serve:
        apply_server_defaults(ns)
    return from_cli_args(ns).create_engine_config().scheduler_config.max_num_batched_tokens


def test_the_server_takes_the_streaming_budget_offline_keeps_its_own(tiny_models):
    model = tiny_models["qwen3"][0]
    common = ["--load-format", "dummy", "--max-model-len", "256"]
    assert SERVER_MAX_NUM_BATCHED_TOKENS == 1024
    assert budget(["serve", "--model", model, *common], serve=True) == 1024
    assert budget(["generate", "--model", model, "--prompt", "x", *common], serve=False) == 8192
    # the user's budget wins; without chunked prefill the budget must hold a whole prompt
    assert budget(["serve", "--model", model, *common, "--max-num-batched-tokens", "512"], serve=True) == 512
    assert budget(["serve", "--model", model, *common, "--no-enable-chunked-prefill"], serve=True) == 8192
