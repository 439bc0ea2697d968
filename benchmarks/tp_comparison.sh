#!/usr/bin/env bash
# BENCHMARKS.md's tp workload in one run on a machine with two GPUs, from the repository root:
#   bash benchmarks/tp_comparison.sh
# one NCCL all-reduce of a decode step's size on its own (benchmarks/allreduce_time.py); the
# tensor-parallel GPU tests (TP=2 tokens against TP=1's); then Qwen3-8B shapes with dummy bf16
# weights (benchmarks/configs/qwen3-8b): batch-1 latency and the throughput workload, TP=1 and
# TP=2. Should a TP=2 run with CUDA graphs leave no result (capturing NCCL all-reduces in a graph
# failing, say), the same pair runs again with --enforce-eager on both sides while time is left
# (EAGER_FALLBACK=0 turns that off). Every step has a time limit and the whole run stays within
# TOTAL_S (default 540 s). JSON under ${OUT:-/tmp/out}, one log, a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/common.sh
source benchmarks/common.sh

start_log tp.log

MODEL=benchmarks/configs/qwen3-8b

have() { [ -s "$OUT/$1" ]; }

# Stale results of an earlier run in the same $OUT would be read as this run's.
rm -f "$OUT"/allreduce.json "$OUT"/latency_tp*.json "$OUT"/throughput_tp*.json "$OUT"/tp_table.txt

tstep allreduce 45 python3 benchmarks/allreduce_time.py --output-json "$OUT/allreduce.json"
tstep tp_gpu_tests 150 python3 -m pytest -q --durations=0 tests/gpu/test_tensor_parallel_gpu.py

# One engine per process: each takes 90% of its GPU's free memory for its KV cache.
tstep latency_tp1 75 $FOLO bench latency --model "$MODEL" --batch-sizes 1 --output-json "$OUT/latency_tp1.json"
tstep latency_tp2 75 $FOLO bench latency --model "$MODEL" --batch-sizes 1 --tensor-parallel-size 2 \
  --output-json "$OUT/latency_tp2.json"
if [ "${EAGER_FALLBACK:-1}" = 1 ] && ! have latency_tp2.json; then
  tstep latency_tp2_eager 75 $FOLO bench latency --model "$MODEL" --batch-sizes 1 --tensor-parallel-size 2 \
    --enforce-eager --output-json "$OUT/latency_tp2_eager.json"
  if have latency_tp2_eager.json; then
    tstep latency_tp1_eager 75 $FOLO bench latency --model "$MODEL" --batch-sizes 1 --enforce-eager \
      --output-json "$OUT/latency_tp1_eager.json"
  fi
fi

tstep throughput_tp1 100 $FOLO bench throughput --model "$MODEL" --output-json "$OUT/throughput_tp1.json"
tstep throughput_tp2 100 $FOLO bench throughput --model "$MODEL" --tensor-parallel-size 2 \
  --output-json "$OUT/throughput_tp2.json"
if [ "${EAGER_FALLBACK:-1}" = 1 ] && ! have throughput_tp2.json; then
  tstep throughput_tp2_eager 100 $FOLO bench throughput --model "$MODEL" --tensor-parallel-size 2 \
    --enforce-eager --output-json "$OUT/throughput_tp2_eager.json"
  if have throughput_tp2_eager.json; then
    tstep throughput_tp1_eager 100 $FOLO bench throughput --model "$MODEL" --enforce-eager \
      --output-json "$OUT/throughput_tp1_eager.json"
  fi
fi

echo | tee -a "$LOG"
python3 - "$OUT" "$LOG" "$MODEL/config.json" <<'PY' | tee "$OUT/tp_table.txt" | tee -a "$LOG"
import json, os, re, sys

out, log, config = sys.argv[1:4]


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pair(kind):
    """(TP=1 result, TP=2 result, label): the default runs (CUDA graphs on a GPU) if TP=2 gave a
    result, else the --enforce-eager pair."""
    one, two = load(f"{kind}_tp1.json"), load(f"{kind}_tp2.json")
    if two is None and load(f"{kind}_tp2_eager.json") is not None:
        return load(f"{kind}_tp1_eager.json"), load(f"{kind}_tp2_eager.json"), " (eager)"
    return one, two, ""


def batch1(r, field):
    rows = [row for row in (r or {}).get("results", []) if row["batch_size"] == 1]
    return rows[0][field] if rows and rows[0][field] is not None else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def verdict(ratio, bar, at_most):
    if ratio is None:
        return "NO RESULT"
    return "PASS" if (ratio <= bar if at_most else ratio >= bar) else "MISS"


steps = {}
try:
    for line in open(log):
        m = re.match(r"=== (\S+): (rc=(-?\d+) after (\d+) s|skipped.*)$", line.strip())
        if m:
            steps[m.group(1)] = f"rc={m.group(3)} {m.group(4)} s" if m.group(3) is not None else "skipped"
except OSError:
    pass
layers = json.load(open(config))["num_hidden_layers"]
per_step = 2 * layers + 1  # o_proj and down_proj of every layer, and the embedding

lat1, lat2, lat_label = pair("latency")
tput1, tput2, tput_label = pair("throughput")
dev = next((r["device"] for r in (lat2, tput2, lat1, tput1) if r), "?")
print(f"tp workload: Qwen3-8B shapes, dummy bf16, on {dev}")
print("steps: " + (", ".join(f"{k} {v}" for k, v in steps.items()) or "none logged"))
print(f"{'':<32} {'TP=1':>10} {'TP=2':>10} {'TP=2/TP=1':>10} {'bar':>8}  result")

t1, t2 = batch1(lat1, "tpot_ms"), batch1(lat2, "tpot_ms")
r = t2 / t1 if t1 and t2 else None
print(f"{'batch-1 TPOT ms' + lat_label:<32} {fmt(t1, '.2f'):>10} {fmt(t2, '.2f'):>10} {fmt(r, '.3f'):>10} "
      f"{'<= 0.60':>8}  {verdict(r, 0.6, True)}")
f1, f2 = batch1(lat1, "ttft_ms"), batch1(lat2, "ttft_ms")
print(f"{'batch-1 TTFT ms' + lat_label:<32} {fmt(f1, '.2f'):>10} {fmt(f2, '.2f'):>10} "
      f"{fmt(f2 / f1 if f1 and f2 else None, '.3f'):>10}")
o1 = tput1["output_tokens_per_s"] if tput1 else None
o2 = tput2["output_tokens_per_s"] if tput2 else None
r = o2 / o1 if o1 and o2 else None
print(f"{'throughput out tok/s' + tput_label:<32} {fmt(o1, ',.0f'):>10} {fmt(o2, ',.0f'):>10} "
      f"{fmt(r, '.3f'):>10} {'>= 1.60':>8}  {verdict(r, 1.6, False)}")
w1, w2 = (tput1 or {}).get("wall_s"), (tput2 or {}).get("wall_s")
print(f"{'throughput wall s' + tput_label:<32} {fmt(w1, '.2f'):>10} {fmt(w2, '.2f'):>10}")
for r_ in (tput1, tput2):
    if r_ and r_.get("notes"):
        print(f"  notes ({'TP=1' if r_ is tput1 else 'TP=2'}): {'; '.join(r_['notes'])}")

ar = load("allreduce.json")
if ar is None:
    print("all-reduce: no result (see the log)")
else:
    print(f"one all_reduce of [tokens, {ar['hidden']}] {ar['dtype']} over {ar['world_size']} ranks "
          f"({ar['backend']}{' ' + ar['nccl'] if ar.get('nccl') else ''}), us per call; "
          f"x {per_step} = all-reduces of one step")
    print(f"{'tokens':>8} {'eager us':>9} {'graph us':>9} {'x ' + str(per_step) + ' ms':>9}")
    for row in ar["results"]:
        best = row["graph_us"] if row.get("graph_us") is not None else row["eager_us"]
        print(f"{row['tokens']:>8} {row['eager_us']:>9.1f} {fmt(row.get('graph_us'), '.1f'):>9} "
              f"{per_step * best / 1e3:>9.3f}")
    if ar.get("graph_error"):
        print(f"  graph capture failed: {ar['graph_error']}")
    one_token = [row for row in ar["results"] if row["tokens"] == 1]
    if one_token and t2:
        row = one_token[0]
        graphs = not lat_label and lat2.get("device_type") == "cuda" and row.get("graph_us") is not None
        comm = per_step * (row["graph_us"] if graphs else row["eager_us"]) / 1e3
        print(f"batch-1 step at TP=2: TPOT {t2:.2f} ms, of which {per_step} all-reduces of one token "
              f"({'graph' if graphs else 'eager'}) {comm:.3f} ms = {comm / t2:.0%}"
              + (f"; TP=1 TPOT / 2 + those = {t1 / 2 + comm:.2f} ms" if t1 else "")
              + " (the LM head's all-gather is not counted)")
PY
