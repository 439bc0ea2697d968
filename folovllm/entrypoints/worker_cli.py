"""`folovllm worker`: one non-zero tensor-parallel rank of an engine whose rank 0 runs elsewhere
(another host, or another process here). It reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and
LOCAL_RANK from the environment, joins rank 0 through env://, loads its shard, then runs the
commands rank 0 broadcasts until rank 0 shuts down (exit 0) or goes away (exit 1).

Pass the same engine flags as rank 0 (model, --tensor-parallel-size, dtype, lengths, ...): the
ranks compare the settings that must agree and refuse to start when they differ."""

from __future__ import annotations

import argparse
import signal


def cmd_worker(ns: argparse.Namespace) -> int:
    from folovllm.engine.arg_utils import from_cli_args
    from folovllm.executor.external import serve_commands

    # Ctrl-C on a worker's terminal stops it; rank 0 then sees a broken collective.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config = from_cli_args(ns).create_engine_config()
    try:
        return serve_commands(config)
    except KeyboardInterrupt:
        return 130


def register(subparsers) -> None:
    from folovllm.engine.arg_utils import add_cli_args

    p = subparsers.add_parser(
        "worker", help="run tensor-parallel rank RANK (1..WORLD_SIZE-1) for an engine on rank 0",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p)
    p.set_defaults(func=cmd_worker)
