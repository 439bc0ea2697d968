#!/usr/bin/env bash
# Prefix caching and chunked prefill in one GPU run, from the repository root:
#   bash benchmarks/cache_chunk_comparison.sh
# the prefix workload (cache on vs off), the chunked workload (budgets 1024 and 2048 vs
# unchunked), the throughput workload with the prefix cache on vs off (what caching costs where
# nothing is shared) and chunked vs not; then (unless WITH_TESTS=0) the engine-level GPU tests
# and the per-step times of a chunked 8192-token prompt next to 64 decoders with the kernels of
# those steps. JSON under ${OUT:-/tmp/out}, one log, a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/common.sh
source benchmarks/common.sh

start_log cache_chunk.log

# One mode per process: each engine takes the free GPU memory for its KV cache.
step prefix_on 70 $FOLO bench prefix --modes on --output-json "$OUT/prefix_on.json"
step prefix_off 70 $FOLO bench prefix --modes off --output-json "$OUT/prefix_off.json"
step chunked 70 $FOLO bench chunked --modes chunked --output-json "$OUT/chunked_chunked.json"
step chunked_2048 70 $FOLO bench chunked --modes chunked --chunked-budget 2048 --output-json "$OUT/chunked_2048.json"
step unchunked 70 $FOLO bench chunked --modes unchunked --output-json "$OUT/chunked_unchunked.json"
# The throughput workload: the prefix cache's cost where nothing is shared, and chunked prefill's
# (the offline budget, and the server's) against whole prompts.
step throughput_cache_off 80 $FOLO bench throughput --output-json "$OUT/throughput_off.json"
step throughput_cache_on 80 $FOLO bench throughput --enable-prefix-caching --output-json "$OUT/throughput_on.json"
step throughput_budget_1024 80 $FOLO bench throughput --max-num-batched-tokens 1024 \
  --output-json "$OUT/throughput_1024.json"
step throughput_unchunked 80 $FOLO bench throughput --no-enable-chunked-prefill \
  --output-json "$OUT/throughput_unchunked.json"
if [ "${WITH_TESTS:-1}" = 1 ]; then
  step gpu_engine_tests 120 python3 -m pytest -q -x tests/gpu/test_engine_gpu.py tests/gpu/test_graph_padding_gpu.py
  step profile_chunked 60 python3 benchmarks/profile_chunked.py --budget 1024 --kernels
fi

echo | tee -a "$LOG"
python3 - "$OUT" <<'PY' | tee "$OUT/table.txt" | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
for name in ("prefix_on", "prefix_off"):
    r = load(name + ".json")
    for mode, m in (r or {}).get("results", {}).items():
        print(f"prefix cache {mode:>3}: all 64 first tokens {m['all_first_tokens_ms']:8.1f} ms | wall with "
              f"{r['output_len']} output tokens {m['wall_ms']:8.1f} ms | {m['cached_prompt_tokens']:,} cached")
for name in ("chunked_chunked", "chunked_2048", "chunked_unchunked"):
    r = load(name + ".json")
    for mode, m in (r or {}).get("results", {}).items():
        print(f"{mode:>9} (budget {m['max_num_batched_tokens']}): decoders' gap p50 {m['itl_p50_ms']:.1f} / "
              f"p99 {m['itl_p99_ms']:.1f} / max {m['itl_max_ms']:.1f} ms | long TTFT "
              + ", ".join(f"{t:.0f}" for t in m["long_ttft_ms"]) + " ms")
off = load("throughput_off.json")
for name, what in (("throughput_on", "prefix cache on"), ("throughput_1024", "budget 1024"),
                   ("throughput_unchunked", "unchunked")):
    r = load(name + ".json")
    if off and r:
        print(f"throughput, {what} {r['output_tokens_per_s']:,.0f} vs budget 8192, cache off {off['output_tokens_per_s']:,.0f} "
              f"output tok/s ({r['output_tokens_per_s'] / off['output_tokens_per_s'] - 1:+.1%})")
PY
