"""CPU microbenchmarks of the engine's host-side pieces, one small function per figure quoted in docs/.

    python benchmarks/micro_cpu.py                            # everything: ~2 minutes on 2 cores
    python benchmarks/micro_cpu.py block_pool sampler --repeats 9

Sections: block_pool, scheduler, input_batch, sampler, detokenizer, engine_step. Every figure is
the median of several timed repeats (the machine may be shared, so medians, not means or minima).
No model weights are needed: the scheduler is driven by a fake runner (as
tests/unit/test_scheduler.py does) and engine_step runs a tiny dummy-weight Qwen3. The
detokenizer section uses the default model's tokenizer when it is already cached and is skipped
otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch

from folovllm.config import CacheConfig, SchedulerConfig
from folovllm.core.block_pool import BlockPool
from folovllm.core.kv_cache_utils import extend_block_hashes
from folovllm.core.sched.output import ModelRunnerOutput
from folovllm.core.sched.scheduler import Scheduler
from folovllm.request import Request
from folovllm.sample.metadata import build_sampling_metadata
from folovllm.sample.sampler import Sampler
from folovllm.sampling_params import SamplingParams
from folovllm.worker.input_batch import InputBatch

VOCAB = 151936  # Qwen2/Qwen3


def median_time(fn, repeats: int, setup=None) -> float:
    """Median seconds of fn() over `repeats` calls; setup() runs untimed before each."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row(name: str, value: float, unit: str) -> None:
    print(f"  {name:<58} {value:>12,.2f} {unit}")


# ---- block pool ------------------------------------------------------------------------------

def bench_block_pool(repeats: int) -> None:
    print("block_pool (BlockPool of 4096 blocks)")
    pool = BlockPool(4096, enable_caching=True)
    n = 100_000

    def one_at_a_time():
        for _ in range(n):
            pool.free_blocks(pool.get_new_blocks(1))

    row("get_new_blocks(1) + free_blocks, pairs per second", n / median_time(one_at_a_time, repeats), "/s")

    def request_sized():  # a 16-block (256-token) request, freed tail first as KVCacheManager.free does
        for _ in range(n // 16):
            pool.free_blocks(reversed(pool.get_new_blocks(16)))

    row("16 blocks at a time: blocks allocated + freed per second", n / median_time(request_sized, repeats), "/s")

    tokens = list(range(2048))
    row("extend_block_hashes, 2048-token prompt (128 blocks of 16)",
        1e6 * median_time(lambda: extend_block_hashes([], 16, tokens), repeats * 10), "us")


# ---- scheduler -------------------------------------------------------------------------------

def decode_scheduler(num_reqs: int, caching: bool, prompt_len: int = 128) -> Scheduler:
    """num_reqs requests of prompt_len prompt tokens, stepped until all of them are decoding."""
    sc = SchedulerConfig(max_num_seqs=num_reqs, max_num_batched_tokens=8192)
    sc.finalize(4096)
    cc = CacheConfig(block_size=16, enable_prefix_caching=caching)
    cc.num_gpu_blocks = num_reqs * 260
    sched = Scheduler(sc, cc)
    for i in range(num_reqs):
        prompt = [(i * 131 + j) % VOCAB for j in range(prompt_len)]
        sched.add_request(Request(str(i), prompt, SamplingParams(max_tokens=3000), arrival_time=0.0))
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        fake_step(sched)
    return sched


def fake_runner(so) -> ModelRunnerOutput:
    """What a runner answers when every scheduled request samples one token."""
    req_ids = list(so.num_scheduled_tokens)
    return ModelRunnerOutput(req_ids, [[7] for _ in req_ids])


def fake_step(sched: Scheduler):
    so = sched.schedule()
    sched.update_from_output(so, fake_runner(so))


def bench_scheduler(repeats: int) -> None:
    print("scheduler (fake runner; 256 running requests, all decoding, budget 8192)")
    for caching in (False, True):
        sched = decode_scheduler(256, caching)
        t_sched, t_update = [], []
        for _ in range(max(repeats, 1) * 30):
            t0 = time.perf_counter()
            so = sched.schedule()
            t1 = time.perf_counter()
            ro = fake_runner(so)
            t2 = time.perf_counter()
            sched.update_from_output(so, ro)
            t3 = time.perf_counter()
            assert len(so.num_scheduled_tokens) == 256
            t_sched.append(t1 - t0)
            t_update.append(t3 - t2)
        tag = "prefix caching on" if caching else "prefix caching off"
        row(f"schedule() per step, {tag}", 1e3 * statistics.median(t_sched), "ms")
        row(f"update_from_output() per step, {tag}", 1e3 * statistics.median(t_update), "ms")
    # Long contexts: over 16 steps every request fills one block, which prefix caching enters in
    # the cache. The cost must not grow with the 128 full blocks each request already has.
    for caching in (False, True):
        means = []
        for _ in range(max(repeats, 1)):
            sched = decode_scheduler(256, caching, prompt_len=2048)
            t0 = time.perf_counter()
            for _ in range(16):
                fake_step(sched)
            means.append((time.perf_counter() - t0) / 16)
        tag = "prefix caching on" if caching else "prefix caching off"
        row(f"context 2048: schedule() + update per step, {tag}", 1e3 * statistics.median(means), "ms")


# ---- input batch -----------------------------------------------------------------------------

def bench_input_batch(repeats: int) -> None:
    print("input_batch (InputBatch.prepare, block_size 16)")
    bs, mml = 16, 4096
    params = SamplingParams()

    batch = InputBatch(256, mml, bs)
    ids = [str(i) for i in range(256)]
    for i, rid in enumerate(ids):  # 256 requests with 1023 computed tokens and one new one each
        blocks = list(range(i * 64, i * 64 + 64))
        batch.add_request(rid, list(range(1024)), params, blocks, 1023, None)

    def reset_decode():
        batch.num_computed_tokens[:256] = 1023

    t = median_time(lambda: batch.prepare(ids, [1] * 256), repeats * 30, reset_decode)
    row("256 decode rows (context 1024): prepare()", 1e6 * t, "us")

    one = InputBatch(1, mml, bs)
    one.add_request("p", list(range(2048)), params, list(range(128)), 0, None)

    def reset_prefill():
        one.num_computed_tokens[0] = 0

    t = median_time(lambda: one.prepare(["p"], [2048]), repeats * 30, reset_prefill)
    row("one 2048-token prefill: prepare()", 1e6 * t, "us")


# ---- sampler ---------------------------------------------------------------------------------

def bench_sampler(repeats: int) -> None:
    n = 256
    print(f"sampler (Sampler.forward on [{n}, {VOCAB}] float32 logits, {torch.get_num_threads()} torch threads)")
    torch.manual_seed(0)
    logits = torch.randn(n, VOCAB)
    sampler = Sampler()
    prompt = [list(range(i, i + 128)) for i in range(n)]
    output = [list(range(1000 + i, 1000 + i + 128)) for i in range(n)]
    cases = {
        "greedy": dict(temperature=0.0),
        "greedy + logprobs=5": dict(temperature=0.0, logprobs=5),
        "temperature 0.8": dict(temperature=0.8),
        "temperature 0.8 + top_k 50 + top_p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
        "temperature 0.8 + top_k 50 + top_p 0.9, seeded": dict(temperature=0.8, top_k=50, top_p=0.9),
        "temperature 0.8 + repetition_penalty 1.1 (128+128 ids a row)": dict(temperature=0.8, repetition_penalty=1.1),
    }
    for name, kw in cases.items():
        params = [SamplingParams(**kw) for _ in range(n)]
        gens = {}
        if "seeded" in name:
            gens = {i: torch.Generator().manual_seed(i) for i in range(n)}

        def build():
            return build_sampling_metadata(params, [128] * n, gens, VOCAB, torch.device("cpu"),
                                           lambda: (prompt, output))

        md = build()
        t = median_time(lambda: sampler(logits, md), repeats)
        row(name, 1e3 * t, "ms")
        if name.endswith("top_p 0.9"):
            row("  build_sampling_metadata for those 256 rows", 1e6 * median_time(build, repeats * 10), "us")
    # The primitives that dominate on CPU.
    noise = torch.empty_like(logits)
    row("  primitive: argmax over the vocabulary", 1e3 * median_time(lambda: logits.argmax(-1), repeats), "ms")
    row("  primitive: exponential_ noise for the whole batch", 1e3 * median_time(noise.exponential_, repeats), "ms")
    row("  primitive: sort over the vocabulary", 1e3 * median_time(lambda: logits.sort(dim=-1), repeats), "ms")
    row("  primitive: topk(50) over the vocabulary", 1e3 * median_time(lambda: logits.topk(50, dim=-1), repeats),
        "ms")


# ---- detokenizer -----------------------------------------------------------------------------

def bench_detokenizer(repeats: int) -> None:
    from folovllm.assets import default_model_path
    from folovllm.engine.detokenizer import IncrementalDetokenizer

    path = default_model_path()
    if not path.exists():
        print("detokenizer: skipped (the default model is not cached; `make demo` fetches it)")
        return
    from folovllm.model_executor.model_loader.gguf_loader import load_gguf_tokenizer

    tok = load_gguf_tokenizer(str(path))
    text = ("def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[0]\n"
            "    # 分区：小于、等于、大于 pivot 🚀\n") * 20
    ids = tok(text).input_ids[:512]
    print(f"detokenizer (Qwen2.5 tokenizer, {len(ids)} generated tokens fed one at a time)")
    params = SamplingParams(stop=["\n\n\n", "STOP"])

    def incremental():
        d = IncrementalDetokenizer(tok, [], params)
        for t in ids:
            d.update([t])
        d.finish()

    def full_redecode():  # what one would do without offsets: decode everything every step
        for i in range(1, len(ids) + 1):
            tok.decode(ids[:i], skip_special_tokens=True)

    row("IncrementalDetokenizer.update, per token", 1e6 * median_time(incremental, repeats) / len(ids), "us")
    row("full re-decode of all output each step, per token", 1e6 * median_time(full_redecode, repeats) / len(ids),
        "us")


# ---- a whole engine step ---------------------------------------------------------------------

TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "tie_word_embeddings": True, "hidden_act": "silu", "eos_token_id": 0, "torch_dtype": "float32",
}


def bench_engine_step(repeats: int) -> None:
    """Where one decode step's time goes with a model so small that the rest shows."""
    from folovllm.engine.arg_utils import EngineArgs
    from folovllm.engine.llm_engine import LLMEngine

    print("engine_step (tiny dummy Qwen3: 2 layers, hidden 64, vocab 151936; 256 requests decoding, greedy)")
    with tempfile.TemporaryDirectory() as folder:
        with open(f"{folder}/config.json", "w") as f:
            json.dump(TINY_QWEN3, f)
        engine = LLMEngine.from_engine_args(EngineArgs(
            model=folder, load_format="dummy", skip_tokenizer_init=True, device="cpu", max_model_len=2048,
            num_gpu_blocks_override=256 * 128, attention_backend="torch"))
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    for i in range(256):
        engine.add_request(None, {"prompt_token_ids": [(i * 7 + j) % 1000 for j in range(32)]}, params)
    core = engine.engine_core
    core.process_inbox()  # the requests into the scheduler, as the first step would
    sched, runner, out_proc = core.scheduler, core.executor, engine.output_processor
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        engine.step()
    parts: dict[str, list[float]] = {k: [] for k in ("schedule", "execute_model", "update_from_output",
                                                     "output_processor", "total")}
    for _ in range(max(repeats, 1) * 3):
        t0 = time.perf_counter()
        so = sched.schedule()
        t1 = time.perf_counter()
        ro = runner.execute_model(so)
        t2 = time.perf_counter()
        co = sched.update_from_output(so, ro)
        t3 = time.perf_counter()
        out_proc.process(co)
        t4 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            parts[k].append(v)
    for k, v in parts.items():
        row(k, 1e3 * statistics.median(v), "ms")


SECTIONS = {"block_pool": bench_block_pool, "scheduler": bench_scheduler, "input_batch": bench_input_batch,
            "sampler": bench_sampler, "detokenizer": bench_detokenizer, "engine_step": bench_engine_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats}+ repeats")
    for name in args.sections or SECTIONS:
        SECTIONS[name](args.repeats)


if __name__ == "__main__":
    main()
