"""The `folovllm` command: generate and chat (serve, bench and friends plug in as subcommands)."""

from __future__ import annotations

import argparse
import sys
import time

from folovllm.engine.arg_utils import add_cli_args, from_cli_args
from folovllm.entrypoints.chat_utils import apply_chat_template
from folovllm.logger import set_level
from folovllm.sampling_params import SamplingParams


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def sampling_params_from(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                          top_k=ns.top_k, min_p=ns.min_p, repetition_penalty=ns.repetition_penalty,
                          seed=ns.sampling_seed, stop=ns.stop, ignore_eos=ns.ignore_eos)


def stream(engine, prompt, params: SamplingParams, out=None):
    """Run one request, writing its text as it grows (to stdout unless `out` is given). Returns
    the final RequestOutput."""
    out = out or sys.stdout  # looked up per call: stdout may be replaced after import
    printed = 0
    final = None
    for o in engine.iter_outputs([engine.add_request(None, prompt, params)]):
        text = o.outputs[0].text
        out.write(text[printed:])
        out.flush()
        printed = len(text)
        final = o
    out.write("\n")
    return final


def chat_prompt(engine, messages: list[dict[str, str]]) -> dict:
    try:
        return {"prompt_token_ids": apply_chat_template(engine.tokenizer, messages)}
    except ValueError as e:
        if "chat template" in str(e) or "tokenizer" in str(e):
            raise ValueError(f"{e}; leave out --chat / use `folovllm generate`") from e
        raise


DEFAULT_PROMPT = "def quicksort(arr):"


def prompts_from_stdin() -> list[str]:
    """Without --prompt: the whole of standard input as one prompt when it is a pipe or a file,
    the built-in example prompt when it is a terminal (said on stderr, so it is no surprise)."""
    if sys.stdin is not None and not sys.stdin.isatty():
        text = sys.stdin.read()
        if not text.strip():
            raise ValueError("standard input is empty; pass --prompt TEXT or pipe the prompt in")
        return [text]
    print(f"[no --prompt given: using {DEFAULT_PROMPT!r}]", file=sys.stderr)
    return [DEFAULT_PROMPT]


def cmd_generate(ns: argparse.Namespace) -> int:
    from folovllm.engine.llm_engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine.from_engine_args(from_cli_args(ns))
    load_s = time.perf_counter() - t0
    params = sampling_params_from(ns)
    prompts = ns.prompt or prompts_from_stdin()
    for prompt in prompts:
        if len(prompts) > 1 or ns.echo:
            sys.stdout.write(prompt if ns.echo else f"--- {prompt!r}\n")
        t1 = time.perf_counter()
        inputs = chat_prompt(engine, [{"role": "user", "content": prompt}]) if ns.chat else prompt
        out = stream(engine, inputs, params)
        dt = time.perf_counter() - t1
        n = len(out.outputs[0].token_ids)
        print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s; finish_reason={out.outputs[0].finish_reason}; "
              f"engine start-up {load_s:.1f} s]", file=sys.stderr)
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    from folovllm.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(from_cli_args(ns))
    chat_prompt(engine, [{"role": "user", "content": "hi"}])  # fails now if the model cannot chat
    params = sampling_params_from(ns)
    messages = [{"role": "system", "content": ns.system}] if ns.system else []
    print("Chat with the model. Empty line or Ctrl-D to quit, /reset to start over.", file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        if user == "/reset":
            messages = messages[:1] if ns.system else []
            continue
        messages.append({"role": "user", "content": user})
        sys.stdout.write("assistant> ")
        out = stream(engine, chat_prompt(engine, messages), params)
        messages.append({"role": "assistant", "content": out.outputs[0].text})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="folovllm", description="FoloVLLM: a compact LLM inference engine")
    parser.add_argument("--log-level", default="INFO", help="of FoloVLLM's own messages (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one or more prompts, streaming the text")
    gen.add_argument("--prompt", action="append",
                     help="prompt text (repeatable); without it, standard input is the prompt")
    gen.add_argument("--echo", action="store_true", help="print the prompt before its completion")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    add_sampling_args(gen)
    add_cli_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive chat through the model's chat template")
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(chat)
    add_cli_args(chat)
    chat.set_defaults(func=cmd_chat, temperature=0.7, top_p=0.8, max_tokens=512)

    from folovllm.bench.cli import register as register_bench
    register_bench(sub)
    from folovllm.entrypoints.openai.cli_args import register as register_serve
    register_serve(sub)
    from folovllm.eval.cli import register as register_eval
    register_eval(sub)
    from folovllm.quantization.cli import register as register_quantize
    register_quantize(sub)
    from folovllm.entrypoints.worker_cli import register as register_worker
    register_worker(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    set_level(ns.log_level)
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
