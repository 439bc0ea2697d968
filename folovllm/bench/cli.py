"""`folovllm bench throughput|latency|table|cpu`: the BENCHMARKS.md workloads from the command line.

Engine flags are those of `folovllm generate`; the model defaults to the bench Qwen3-0.6B config
with dummy weights (for `bench cpu`: the real GGUF model). `--seed` seeds both the workload and the
dummy weights, as in vLLM's bench.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from folovllm.bench.workloads import default_bench_model, parse_range
from folovllm.engine.arg_utils import add_cli_args, from_cli_args

def _batch_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes are positive ints like 1,8,32, got {text!r}")
    return sizes


def _write(result: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))


def _offline_command(name: str):
    """The command of an offline workload: folovllm.bench.<name>'s run() on the engine flags, its
    report printed, the result written as JSON when asked."""
    def command(ns: argparse.Namespace) -> int:
        import importlib

        module = importlib.import_module(f"folovllm.bench.{name}")
        result = module.run(ns, from_cli_args(ns))
        print(module.report(result))
        _write(result, ns.output_json)
        return 0
    return command


cmd_throughput, cmd_latency = _offline_command("throughput"), _offline_command("latency")
cmd_prefix, cmd_chunked = _offline_command("prefix"), _offline_command("chunked")
cmd_cpu = _offline_command("cpu")


def _modes(choices):
    def parse(text: str) -> list[str]:
        modes = [m for m in text.split(",") if m]
        if not modes or any(m not in choices for m in modes):
            raise argparse.ArgumentTypeError(f"modes are a comma-separated list of {', '.join(choices)}, got {text!r}")
        return modes
    return parse


def _rate(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"--request-rate must be > 0 requests/s (or inf), got {text!r}")
    return rate


def cmd_serve(ns: argparse.Namespace) -> int:
    import asyncio

    from folovllm.bench import serve

    model = ns.model or serve.model_of(ns.base_url, ns.api_key)
    requests = serve.serve_workload(ns.num_prompts, ns.input_len_range, ns.output_len_range, ns.seed)
    result = asyncio.run(serve.run_async(ns.base_url, model, requests, ns.request_rate, ns.max_concurrency,
                                         ns.temperature, ns.seed, ns.api_key, progress=not ns.no_progress,
                                         num_warmups=ns.num_warmups))
    result.update(kind="serve", base_url=ns.base_url, model=model, request_rate=ns.request_rate,
                  max_concurrency=ns.max_concurrency)
    print(serve.report(result))
    _write(result, ns.output_json)
    return 0 if result["failed"] == 0 else 1


def summary_table(results: list[dict]) -> str:
    """The ceilings, one line per throughput run and per latency batch size, and the ratio of the
    two throughput backends."""
    lines = [f"ceilings on {r['ceilings']['device']} ({r['ceilings']['label']}): "
             f"{r['ceilings']['bandwidth'] / 1e12:.3f} TB/s copy, {r['ceilings']['flops'] / 1e12:.1f} TFLOP/s "
             f"{r['ceilings']['dtype']} matmul; floor of the full throughput workload "
             f"{r['throughput_floor']['floor_s']:.2f} s" for r in results if r.get("kind") == "ceilings"]
    lines += [f"{'run':<24} {'device':<26} {'wall s':>8} {'out tok/s':>10} {'tot tok/s':>10} {'floor s':>8} "
             f"{'floor %':>8}  notes"]
    def name(r: dict) -> str:  # a synchronous FoloVLLM run is labelled so
        return r["backend"] + (" sync" if r.get("settings", {}).get("async_scheduling") is False else "")

    for r in results:
        if r.get("kind") == "throughput":
            lines.append(f"{'throughput ' + name(r):<24} {r['device'][:26]:<26} {r['wall_s']:>8.2f} "
                         f"{r['output_tokens_per_s']:>10,.0f} {r['total_tokens_per_s']:>10,.0f} {r['floor_s']:>8.2f} "
                         f"{r['floor_fraction']:>8.1%}  {'; '.join(r['notes'])}")
    tput = {name(r): r for r in results if r.get("kind") == "throughput"}
    if {"folovllm", "hf"} <= tput.keys():
        ratio = tput["folovllm"]["output_tokens_per_s"] / tput["hf"]["output_tokens_per_s"]
        same = tput["folovllm"]["num_requests"] == tput["hf"]["num_requests"]
        lines.append(f"folovllm / hf output tokens/s: {ratio:.2f}x"
                     + ("" if same else " (NOT the same requests: see notes)"))
    lines.append(f"{'run':<24} {'device':<26} {'batch':>8} {'TTFT ms':>10} {'TPOT ms':>10}")
    for r in results:
        if r.get("kind") == "latency":
            for row in r["results"]:
                tpot = f"{row['tpot_ms']:.2f}" if row["tpot_ms"] is not None else "-"
                lines.append(f"{'latency ' + r['backend']:<24} {r['device'][:26]:<26} {row['batch_size']:>8} "
                             f"{row['ttft_ms']:>10.2f} {tpot:>10}")
    lines += [f"{r['name']:<24} FAILED: {r['reason']}" for r in results if r.get("kind") == "failed"]
    return "\n".join(lines)


def cmd_table(ns: argparse.Namespace) -> int:
    results = []
    for path in ns.files:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError):
            results.append(dict(kind="failed", name=Path(path).stem, reason="no result (see the log)"))
    print(summary_table(results))
    return 0


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="the BENCHMARKS.md workloads: throughput, latency, serve")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    tp = sub.add_parser("throughput", help="all requests at once: tokens/s, wall time, floor fraction")
    tp.add_argument("--backend", choices=("folovllm", "hf"), default="folovllm",
                    help="hf: transformers' continuous batching on the same workload, in this process")
    tp.add_argument("--num-prompts", type=int, default=256)
    tp.add_argument("--workload", choices=("throughput", "serve"), default="throughput",
                    help="serve: the requests `bench serve` sends (same lengths, ids and seed), run offline, "
                         "to hold the server's saturation figure to (give its --num-prompts, ranges and "
                         "--temperature 0 too)")
    tp.add_argument("--input-len-range", type=parse_range, default=(100, 1024), help="LO,HI (inclusive)")
    tp.add_argument("--output-len-range", type=parse_range, default=(100, 1024), help="LO,HI (inclusive)")
    tp.add_argument("--temperature", type=float, default=0.6)
    tp.add_argument("--hf-attn-impl", default="paged|sdpa", help="attn_implementation of the hf backend")
    tp.add_argument("--hf-cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                    help="CUDA graphs in the hf backend's continuous batching (on CUDA only)")
    tp.add_argument("--hf-max-memory-percent", type=float, default=0.6,
                    help="share of free GPU memory the hf backend's KV cache may take (see hf_peer.py)")
    tp.add_argument("--output-json", default=None)
    add_cli_args(tp, default_model=default_bench_model())
    tp.set_defaults(func=cmd_throughput, load_format="dummy")

    lat = sub.add_parser("latency", help="TTFT and TPOT per batch size")
    lat.add_argument("--backend", choices=("folovllm", "hf"), default="folovllm",
                     help="hf: eager transformers generate")
    lat.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8, 32, 128])
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=256)
    lat.add_argument("--num-iters", type=int, default=5)
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    lat.add_argument("--output-json", default=None)
    add_cli_args(lat, default_model=default_bench_model())
    lat.set_defaults(func=cmd_latency, load_format="dummy")

    # The throughput and latency workloads repeat prompts: a prefix-cache hit there is not the work
    # being measured, so they run with the cache off unless --enable-prefix-caching is given.
    tp.set_defaults(enable_prefix_caching=False)
    lat.set_defaults(enable_prefix_caching=False)

    px = sub.add_parser("prefix", help="shared prefixes: all first tokens and wall time, prefix caching on vs off")
    px.add_argument("--num-prefixes", type=int, default=4)
    px.add_argument("--requests-per-prefix", type=int, default=16)
    px.add_argument("--prefix-len", type=int, default=2048)
    px.add_argument("--suffix-len", type=int, default=128)
    px.add_argument("--output-len", type=int, default=64)
    px.add_argument("--num-iters", type=int, default=3)
    px.add_argument("--modes", type=_modes(("on", "off")), default=["on", "off"],
                    help="prefix caching on, off or both (default: on,off; --enable-prefix-caching is ignored)")
    px.add_argument("--output-json", default=None)
    add_cli_args(px, default_model=default_bench_model())
    px.set_defaults(func=cmd_prefix, load_format="dummy")

    ch = sub.add_parser("chunked", help="decoders' token gaps while long prompts arrive, chunked prefill vs not")
    ch.add_argument("--num-decoders", type=int, default=64)
    ch.add_argument("--decoder-input-len", type=int, default=512)
    ch.add_argument("--decoder-output-len", type=int, default=1024)
    ch.add_argument("--num-long", type=int, default=4)
    ch.add_argument("--long-input-len", type=int, default=8192)
    ch.add_argument("--long-output-len", type=int, default=16)
    ch.add_argument("--arrival-interval-ms", type=float, default=250.0)
    ch.add_argument("--window-s", type=float, default=1.5, help="gaps counted from the first arrival this long")
    ch.add_argument("--chunked-budget", type=int, default=1024,
                    help="max_num_batched_tokens of the chunked mode (default: folovllm serve's; the "
                         "unchunked one uses max_model_len)")
    ch.add_argument("--modes", type=_modes(("chunked", "unchunked")), default=["chunked", "unchunked"],
                    help="chunked, unchunked or both (default: both; --enable-chunked-prefill and "
                         "--max-num-batched-tokens are ignored)")
    ch.add_argument("--output-json", default=None)
    add_cli_args(ch, default_model=default_bench_model())
    ch.set_defaults(func=cmd_chunked, load_format="dummy", max_model_len=10240)

    cpu = sub.add_parser("cpu", help="CPU: batch-1 TTFT and decode tok/s, a 16-prompt batch, peak RSS, and the "
                                     "memory-bandwidth floor of decode (the real model by default)")
    cpu.add_argument("--prompt-len", type=int, default=128, help="batch-1 prompt tokens (default: %(default)s)")
    cpu.add_argument("--output-len", type=int, default=64, help="output tokens of every request (default: %(default)s)")
    cpu.add_argument("--num-iters", type=int, default=3, help="batch-1 runs, median taken (default: %(default)s)")
    cpu.add_argument("--batch-size", type=int, default=16, help="prompts of the batch run (default: %(default)s)")
    cpu.add_argument("--batch-prompt-len", type=int, default=100,
                     help="about this many tokens per batch prompt, +-4%% (default: %(default)s)")
    cpu.add_argument("--copy-mib", type=int, default=1024,
                     help="size of the tensor copied to measure memory bandwidth (default: %(default)s)")
    cpu.add_argument("--output-json", default=None)
    add_cli_args(cpu)
    # Random prompts never share a prefix; the cache lookups would only be overhead here.
    # max_num_seqs None: the batch size (run() fills it in).
    cpu.set_defaults(func=cmd_cpu, enable_prefix_caching=False, max_num_seqs=None)

    sv = sub.add_parser("serve", help="the serve workload against a running OpenAI-compatible server")
    sv.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    sv.add_argument("--model", default=None, help="model name to send (default: the first in /v1/models)")
    sv.add_argument("--api-key", default=None)
    sv.add_argument("--num-prompts", type=int, default=500)
    sv.add_argument("--input-len-range", type=parse_range, default=(100, 1024), help="LO,HI (inclusive)")
    sv.add_argument("--output-len-range", type=parse_range, default=(100, 512), help="LO,HI (inclusive)")
    sv.add_argument("--request-rate", type=_rate, default=float("inf"),
                    help="Poisson arrivals, requests/s (default inf: all at once)")
    sv.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    sv.add_argument("--temperature", type=float, default=0.0)
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--num-warmups", type=int, default=4,
                    help="untimed requests (the workload's first prompts, 16 tokens each) sent first")
    sv.add_argument("--no-progress", action="store_true")
    sv.add_argument("--output-json", default=None)
    sv.set_defaults(func=cmd_serve)

    table = sub.add_parser("table", help="print one table from the JSON results of bench runs")
    table.add_argument("files", nargs="+")
    table.set_defaults(func=cmd_table)
