"""The chunked workload (BENCHMARKS.md): 64 requests decoding (prompt 512, 1024 output tokens,
greedy); once all 64 stream, 4 requests with 8192-token prompts arrive 250 ms apart;
max_model_len 10240. Reported: the p50, p99 and max gap between the decoders' consecutive tokens
from the first arrival to 1.5 s after it, and the long requests' TTFT, with chunked prefill (a
2048-token budget unless --chunked-budget says otherwise) and without it (each prompt whole in one
step; the budget is then max_model_len).

The engine is stepped in this thread (LLMEngine.step, every request streaming) and a token's time
is when its step's outputs are back on the host: what a caller of the engine sees."""

from __future__ import annotations

import dataclasses
import gc
import time

import numpy as np
import torch

from folovllm.bench.floor import device_name
from folovllm.bench.throughput import resolve_target
from folovllm.bench.workloads import TOKEN_ID_LIMIT, chunked_workload
from folovllm.engine.arg_utils import EngineArgs

MODES = ("chunked", "unchunked")


def _run_mode(engine_args: EngineArgs, chunked: bool, ns, decoders: list[list[int]],
              longs: list[list[int]]) -> dict:
    from folovllm.engine.llm_engine import LLMEngine
    from folovllm.sampling_params import SamplingParams

    args = dataclasses.replace(engine_args, enable_chunked_prefill=chunked,
                               max_num_batched_tokens=ns.chunked_budget if chunked else None)
    engine = LLMEngine.from_engine_args(args)
    budget = engine.config.scheduler_config.max_num_batched_tokens

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    # Warm-up, untimed: a prompt of each kind; then forget them, so nothing timed is a cache hit.
    engine.generate_batch([{"prompt_token_ids": decoders[0]}, {"prompt_token_ids": longs[0]}], greedy(4))
    engine.reset_prefix_cache()

    times: dict[str, list[float]] = {}  # request id -> the time each of its tokens arrived

    def step() -> None:
        outs = engine.step()
        now = time.monotonic()
        for o in outs:
            t = times.get(o.request_id)
            if t is not None:
                t.extend([now] * (len(o.outputs[0].token_ids) - len(t)))

    dec_ids = [engine.add_request(f"decoder-{i}", {"prompt_token_ids": p}, greedy(ns.decoder_output_len))
               for i, p in enumerate(decoders)]
    times.update({rid: [] for rid in dec_ids})
    while any(not times[rid] for rid in dec_ids) and engine.has_unfinished_requests():
        step()
    t0 = time.monotonic()
    end = t0 + ns.window_s
    arrivals = [t0 + k * ns.arrival_interval_ms / 1e3 for k in range(len(longs))]
    long_ids: list[str] = []
    while True:
        now = time.monotonic()
        while len(long_ids) < len(longs) and arrivals[len(long_ids)] <= now:
            k = len(long_ids)
            long_ids.append(engine.add_request(f"long-{k}", {"prompt_token_ids": longs[k]},
                                               greedy(ns.long_output_len), arrival_time=arrivals[k]))
            times[long_ids[-1]] = []
        all_long_started = len(long_ids) == len(longs) and all(times[rid] for rid in long_ids)
        if now >= end and all_long_started:
            break
        if engine.has_unfinished_requests():
            step()
        elif len(long_ids) < len(longs):
            time.sleep(max(0.0, arrivals[len(long_ids)] - now))  # everyone done: wait for the next arrival
        else:
            break
    engine.abort_request(dec_ids + long_ids)  # those still running
    gaps = np.array([b - a for rid in dec_ids for a, b in zip(times[rid], times[rid][1:]) if t0 <= b <= end])
    finished_early = sum(len(times[rid]) >= ns.decoder_output_len and times[rid][-1] < end for rid in dec_ids)
    engine.shutdown()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    p50, p99 = (1e3 * np.percentile(gaps, [50, 99])).tolist() if len(gaps) else (None, None)
    return dict(chunked_prefill=chunked, max_num_batched_tokens=budget, num_gaps=int(len(gaps)),
                itl_p50_ms=p50, itl_p99_ms=p99, itl_max_ms=1e3 * float(gaps.max()) if len(gaps) else None,
                long_ttft_ms=[1e3 * (times[rid][0] - arrivals[k]) for k, rid in enumerate(long_ids)],
                decoders_finished_in_window=int(finished_early))


def run(ns, engine_args: EngineArgs) -> dict:
    model, hf_config, device, dtype = resolve_target(engine_args)
    decoders, longs = chunked_workload(ns.num_decoders, ns.decoder_input_len, ns.num_long, ns.long_input_len,
                                       engine_args.seed, min(TOKEN_ID_LIMIT, hf_config.vocab_size))
    results = {mode: _run_mode(engine_args, mode == "chunked", ns, decoders, longs) for mode in ns.modes}
    notes = []
    spec = (64, 512, 1024, 4, 8192, 250, 1.5, 10240)
    if (ns.num_decoders, ns.decoder_input_len, ns.decoder_output_len, ns.num_long, ns.long_input_len,
            ns.arrival_interval_ms, ns.window_s, engine_args.max_model_len) != spec:
        notes.append("NOT the BENCHMARKS.md workload (counts, lengths or timing changed)")
    if any(m["decoders_finished_in_window"] for m in results.values()):
        notes.append("some decoders finished inside the window: raise --decoder-output-len")
    if device.type == "cpu":
        notes.append("CPU figures")
    return dict(kind="chunked", model=model, device=device_name(device), device_type=device.type,
                dtype=str(dtype).removeprefix("torch."), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                num_decoders=ns.num_decoders, decoder_input_len=ns.decoder_input_len, num_long=ns.num_long,
                long_input_len=ns.long_input_len, arrival_interval_ms=ns.arrival_interval_ms, window_s=ns.window_s,
                max_model_len=engine_args.max_model_len, seed=engine_args.seed, results=results, notes=notes)


def report(r: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x:.1f}"

    notes = f" [{'; '.join(r['notes'])}]" if r["notes"] else ""
    lines = [f"chunked on {r['device']}, {r['dtype']}{notes}: {r['num_decoders']} decoders (prompt "
             f"{r['decoder_input_len']}), {r['num_long']} prompts of {r['long_input_len']} arriving "
             f"{r['arrival_interval_ms']:g} ms apart; decoders' token gaps over {r['window_s']:g} s"]
    for mode, m in r["results"].items():
        ttft = ", ".join(f"{t:.0f}" for t in m["long_ttft_ms"])
        lines.append(f"  {mode:>9} (budget {m['max_num_batched_tokens']}): gap p50 {ms(m['itl_p50_ms'])} | "
                     f"p99 {ms(m['itl_p99_ms'])} | max {ms(m['itl_max_ms'])} ms over {m['num_gaps']} gaps | "
                     f"long TTFT {ttft} ms")
    return "\n".join(lines)
