"""The `folovllm` command: generate and chat (serve, bench and friends plug in as subcommands)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import typing

from folovllm.config import EngineArgs
from folovllm.sampling_params import SamplingParams


def add_engine_args(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """One flag per EngineArgs field, named as vLLM's (--max-model-len, --block-size, ...)."""
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "model":
            from folovllm.assets import DEFAULT_MODEL
            parser.add_argument(flag, default=default_model or DEFAULT_MODEL,
                                help="HF folder, .gguf file, or a known model name (default: %(default)s)")
            continue
        hint = hints[f.name]
        if f.name == "hf_overrides":
            continue
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if base is bool:  # bool, or bool | None where None means "the engine decides"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        parser.add_argument(flag, type=base if base in (int, float, str) else str, default=f.default)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in names})


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
    req_id = engine.add_request(None, prompt, params)
    printed = 0
    final = None
    while final is None:
        for o in engine.step():
            if o.request_id != req_id:
                continue
            text = o.outputs[0].text
            out.write(text[printed:])
            out.flush()
            printed = len(text)
            if o.finished:
                final = o
    out.write("\n")
    return final


def chat_prompt(engine, messages: list[dict[str, str]]) -> dict:
    tok = engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError("this model has no chat template; leave out --chat / use `folovllm generate`")
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return {"prompt_token_ids": list(ids)}


def cmd_generate(ns: argparse.Namespace) -> int:
    from folovllm.engine.llm_engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine.from_engine_args(engine_args_from(ns))
    load_s = time.perf_counter() - t0
    params = sampling_params_from(ns)
    prompts = ns.prompt or ["def quicksort(arr):"]
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

    engine = LLMEngine.from_engine_args(engine_args_from(ns))
    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use `folovllm generate`")
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
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one or more prompts, streaming the text")
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    gen.add_argument("--echo", action="store_true", help="print the prompt before its completion")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive chat through the model's chat template")
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(chat)
    add_engine_args(chat)
    chat.set_defaults(func=cmd_chat, temperature=0.7, top_p=0.8, max_tokens=512)

    from folovllm.bench.cli import register as register_bench
    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
