"""The time of one all-reduce of a decode step's hidden states, on its own.

Each tensor-parallel decoder layer all-reduces its [tokens, hidden] activations twice per step
(after o_proj and after down_proj) and the embedding once more (docs/tensor_parallel.md), so
one all-reduce's time, times 2 x layers + 1, is the communication floor of a step. This measures
torch.distributed.all_reduce (sum) of a [tokens, hidden] tensor:

- eager: `--inner` back-to-back all-reduces, timed with CUDA events (wall clock on CPU); the
  per-call time is the median over `--iters` such loops, each started after a barrier;
- graph (CUDA only, on by default there): the same `--inner` calls captured in one CUDA graph and
  replayed, as the engine's decode graphs run them: no launch cost per call.

Each figure is the slowest rank's median. Defaults: NCCL on 2 GPUs, bf16, hidden 4096 (Qwen3-8B),
tokens 1, 16, 64, 256.

    python3 benchmarks/allreduce_time.py --output-json /tmp/out/allreduce.json
    python3 benchmarks/allreduce_time.py --backend gloo --device cpu --iters 20      # CPU check
    torchrun --nproc-per-node 2 benchmarks/allreduce_time.py                         # also works

Ranks are started with torch.multiprocessing.spawn unless RANK and WORLD_SIZE are already set
(torchrun). The JSON is written after the eager phase and again after the graph phase, so a graph
capture that fails or hangs still leaves the eager figures behind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default=None, help="nccl or gloo (default: nccl with --device cuda, else gloo)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when there are GPUs, else cpu")
    p.add_argument("--world-size", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    p.add_argument("--tokens", default="1,16,64,256", help="rows of the tensor, comma-separated")
    p.add_argument("--hidden", type=int, default=4096, help="columns of the tensor (Qwen3-8B: 4096)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per size first")
    p.add_argument("--iters", type=int, default=100, help="timed loops per size (the median is taken)")
    p.add_argument("--inner", type=int, default=10, help="all-reduces per timed loop (and per captured graph)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the calls inside a CUDA graph (default: on with --device cuda)")
    p.add_argument("--output-json", default=None)
    ns = p.parse_args(argv)
    ns.device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ns.backend = ns.backend or ("nccl" if ns.device == "cuda" else "gloo")
    ns.graph = (ns.device == "cuda") if ns.graph is None else ns.graph
    ns.tokens = [int(t) for t in ns.tokens.split(",") if t]
    if ns.graph and ns.device != "cuda":
        p.error("--graph needs --device cuda")
    if ns.backend == "nccl" and ns.device != "cuda":
        p.error("the nccl backend needs --device cuda")
    if min(ns.tokens) < 1 or ns.iters < 1 or ns.inner < 1:
        p.error("--tokens, --iters and --inner must be positive")
    return ns


# ---- timing ------------------------------------------------------------------------------------

class Clock:
    """Elapsed seconds of a block of device work: CUDA events on a GPU, the wall clock on a CPU
    (where gloo's all_reduce returns once the result is in place)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t1 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._w0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._t1.record()
            self._t1.synchronize()
            return self._t0.elapsed_time(self._t1) / 1e3
        return time.perf_counter() - self._w0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(device: torch.device) -> None:
    sync(device)
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()
    sync(device)


def time_loops(run_loop, device: torch.device, iters: int, inner: int) -> list[float]:
    """Per-call seconds of `iters` loops of `inner` calls each, every loop after a barrier so that
    the ranks start it together."""
    clock = Clock(device)
    per_call = []
    for _ in range(iters):
        barrier(device)
        clock.start()
        run_loop()
        per_call.append(clock.stop() / inner)
    return per_call


def slowest_rank(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def check_sum(x: torch.Tensor, rank: int, world_size: int) -> None:
    """The collective adds up: rank r contributes r + 1 everywhere."""
    x.fill_(rank + 1)
    dist.all_reduce(x)
    sync(x.device)
    want = world_size * (world_size + 1) / 2
    if not bool((x.float() == want).all()):
        raise RuntimeError(f"all_reduce gave {x.flatten()[:4].tolist()}..., expected {want} everywhere")


def measure_eager(x: torch.Tensor, ns) -> tuple[float, float]:
    def loop():
        for _ in range(ns.inner):
            dist.all_reduce(x)

    for _ in range(ns.warmup):
        dist.all_reduce(x)
    times = time_loops(loop, x.device, ns.iters, ns.inner)
    return statistics.median(times), min(times)


def measure_graph(x: torch.Tensor, ns) -> tuple[float, float]:
    # Warm up on a side stream, as torch's capture docs ask; the communicator exists by now (the
    # eager phase ran), so nothing is initialised during capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            dist.all_reduce(x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(ns.inner):
            dist.all_reduce(x)
    torch.cuda.synchronize()
    for _ in range(max(1, ns.warmup // ns.inner)):
        graph.replay()
    times = time_loops(graph.replay, x.device, ns.iters, ns.inner)
    del graph
    return statistics.median(times), min(times)


# ---- one rank --------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write(result: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))


def table(result: dict) -> str:
    lines = [f"all_reduce (sum) of [tokens, {result['hidden']}] {result['dtype']}, {result['backend']}, "
             f"{result['world_size']} ranks on {result['device']}; per call, slowest rank's median of "
             f"{result['iters']} loops of {result['inner']}",
             f"{'tokens':>7} {'bytes':>10} {'eager us':>9} {'(min)':>7} {'GB/s':>7} {'graph us':>9} {'(min)':>7}"]
    for r in result["results"]:
        g = (f"{r['graph_us']:>9.1f} {r['graph_min_us']:>7.1f}" if r.get("graph_us") is not None
             else f"{'-':>9} {'-':>7}")
        lines.append(f"{r['tokens']:>7} {r['bytes']:>10,} {r['eager_us']:>9.1f} {r['eager_min_us']:>7.1f} "
                     f"{r['eager_algbw_GBps']:>7.2f} {g}")
    if result.get("graph_error"):
        lines.append(f"graph capture failed: {result['graph_error']}")
    return "\n".join(lines)


def run_rank(rank: int, world_size: int, ns) -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if ns.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    kwargs = dict(device_id=device) if ns.backend == "nccl" else {}
    dist.init_process_group(ns.backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    dtype = getattr(torch, ns.dtype)
    result = dict(kind="allreduce", backend=ns.backend, device=device_name(device), device_type=device.type,
                  world_size=world_size, dtype=ns.dtype, hidden=ns.hidden, warmup=ns.warmup, iters=ns.iters,
                  inner=ns.inner, torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  nccl=".".join(map(str, torch.cuda.nccl.version())) if ns.backend == "nccl" else None,
                  results=[], graph_error=None)
    try:
        tensors = {}
        for tokens in ns.tokens:
            # Zeros: repeated in-place sums stay zero (no overflow, no denormals on a CPU).
            x = torch.zeros(tokens, ns.hidden, dtype=dtype, device=device)
            check_sum(x, rank, world_size)
            x.zero_()
            med, low = measure_eager(x, ns)
            med, low = slowest_rank(med, device), slowest_rank(low, device)
            nbytes = x.numel() * x.element_size()
            result["results"].append(dict(tokens=tokens, bytes=nbytes, eager_us=med * 1e6, eager_min_us=low * 1e6,
                                          eager_algbw_GBps=nbytes / med / 1e9, graph_us=None, graph_min_us=None))
            tensors[tokens] = x
        if rank == 0:
            write(result, ns.output_json)
        if ns.graph:
            for row in result["results"]:
                x = tensors[row["tokens"]]
                try:
                    med, low = measure_graph(x, ns)
                    ok = 1.0
                except Exception as e:  # noqa: BLE001  reported, and the eager figures stand
                    result["graph_error"] = f"rank {rank}: {type(e).__name__}: {e}"
                    ok = 0.0
                # Both ranks must agree to go on: a rank that failed alone would leave the other
                # waiting in its next collective.
                if slowest_rank(-ok, device) != -1.0:
                    result["graph_error"] = result["graph_error"] or "another rank's capture failed"
                    break
                row.update(graph_us=slowest_rank(med, device) * 1e6, graph_min_us=slowest_rank(low, device) * 1e6)
        if rank == 0:
            write(result, ns.output_json)
            print(table(result), flush=True)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world_size: int, ns) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    run_rank(rank, world_size, ns)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    ns = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or a launcher like it)
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), ns)
        return
    if ns.device == "cuda" and torch.cuda.device_count() < ns.world_size:
        raise SystemExit(f"--world-size {ns.world_size} needs {ns.world_size} GPUs, found {torch.cuda.device_count()}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.multiprocessing.spawn(_spawned, args=(ns.world_size, ns), nprocs=ns.world_size, join=True)


if __name__ == "__main__":  # the ranks are spawned: each imports this file as a module
    main()
