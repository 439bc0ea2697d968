"""The `folovllm serve` command's flags, apart from the server itself so that building the
`folovllm` command's parser never imports FastAPI (api_server.py is imported only to serve)."""

from __future__ import annotations

import argparse

from folovllm.entrypoints.openai import DEFAULT_MAX_BODY_BYTES


def register(sub) -> None:
    """Add `folovllm serve MODEL ...` to the `folovllm` command's subparsers."""
    from folovllm.engine.arg_utils import add_cli_args

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, help="the model to serve (overrides --model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not on /health, /metrics)")
    serve.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the model)")
    serve.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    serve.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    serve.add_argument("--engine-core", choices=("process", "thread"), default="process",
                       help="run the engine core in a process of its own (default), or in a thread of the "
                            "server's process (shares the GIL with the HTTP work; docs/serving.md)")
    add_cli_args(serve)
    serve.set_defaults(func=_run_server)



def _run_server(args: argparse.Namespace) -> int:
    from folovllm.entrypoints.openai.api_server import run_server
    return run_server(args)
