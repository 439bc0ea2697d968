"""`folovllm eval ppl`: perplexity of a model over held-out text (folovllm/eval/perplexity.py).

The model is built as the engine builds it (the same flags: --model, --dtype, --device,
--quantization, ...) but run without the scheduler: one full forward per window."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    from folovllm.engine.arg_utils import add_cli_args

    ev = sub.add_parser("eval", help="measure a model's quality")
    evsub = ev.add_subparsers(dest="eval_command", required=True)
    ppl = evsub.add_parser("ppl", help="perplexity over fixed sliding windows of held-out text")
    ppl.add_argument("--text", default=None,
                     help="UTF-8 text file to score (default: folovllm.quantization.calib.eval_text())")
    ppl.add_argument("--window", type=int, default=1024, help="tokens per window (default: %(default)s)")
    ppl.add_argument("--stride", type=int, default=None,
                     help="tokens between window starts; each window scores its last stride tokens "
                          "(default: half the window, 512)")
    ppl.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    add_cli_args(ppl)
    ppl.set_defaults(func=cmd_ppl)


def eval_text(path: str | None) -> str:
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"--text {path}: no such file")
        return Path(path).read_text(encoding="utf-8")
    try:
        from folovllm.quantization.calib import eval_text as default_text
    except ImportError:
        raise ValueError("no default evaluation text is available; pass --text FILE") from None
    try:
        return default_text()
    except FileNotFoundError as e:
        raise ValueError(f"the default evaluation text is unavailable ({e}); pass --text FILE") from e


def load(ns: argparse.Namespace):
    """(model, tokenizer, EngineConfig) for the engine flags in ns."""
    from folovllm.attention.selector import get_attn_backend_cls
    from folovllm.engine.arg_utils import from_cli_args
    from folovllm.engine.tokenizer import load_tokenizer
    from folovllm.model_executor.model_loader import get_model

    config = from_cli_args(ns).create_engine_config()
    if config.parallel_config.world_size > 1:
        raise ValueError("folovllm eval ppl runs on one device; leave tensor_parallel_size at 1")
    mc, device = config.model_config, config.torch_device()
    if device.type == "cuda":
        import torch
        torch.cuda.set_device(device)
    tokenizer = load_tokenizer(mc)
    if tokenizer is None:
        raise ValueError(f"{mc.model} has no tokenizer; perplexity over text needs one (pass --tokenizer)")
    model = get_model(mc, get_attn_backend_cls(config.attention_backend, device), device)
    return model, tokenizer, config


def cmd_ppl(ns: argparse.Namespace) -> int:
    from folovllm.eval.perplexity import check_windows, perplexity

    if ns.stride is None:
        ns.stride = max(1, ns.window // 2)
    check_windows(ns.window, ns.stride, ns.max_windows)
    text = eval_text(ns.text)
    model, tokenizer, config = load(ns)
    if ns.window > config.model_config.max_model_len:
        raise ValueError(f"--window {ns.window} is longer than max_model_len "
                         f"({config.model_config.max_model_len}); pass a smaller --window")
    ids = tokenizer(text)["input_ids"]
    result = perplexity(model, ids, ns.window, ns.stride, ns.max_windows, config.torch_device())
    print(f"perplexity {result.perplexity:.6f} over {result.num_tokens} tokens "
          f"({result.num_windows} windows of {ns.window}, stride {ns.stride})")
    sys.stdout.flush()
    return 0
