#!/usr/bin/env bash
# The whole BENCHMARKS.md comparison in one GPU run, from the repository root:
#   bash benchmarks/gpu_comparison.sh [--hf-num-prompts N] [--skip-hf] [--engine-args "FLAGS"]
# Device ceilings, throughput (folovllm, then the transformers peer on the same workload),
# latency (folovllm at batch 1, 8, 32, 128; the peer's eager generate at batch 1), each result as
# JSON under ${OUT:-/tmp/out} with one log, and a short table last.
# --hf-num-prompts N runs the peer on the first N of the 256 throughput requests (flagged SUBSET in
# the table) when the full workload (~170-200 s for the peer) does not fit the time at hand.
# --engine-args passes extra engine flags to the folovllm steps (e.g. "--enforce-eager").
# Each step has a time limit, so one stuck step cannot eat the others'. On an H100 the peer's
# throughput step takes ~190 s and the whole run ~5-8 min.
set -uo pipefail
cd "$(dirname "$0")/.."

HF_NUM_PROMPTS=256
SKIP_HF=0
ENGINE_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --hf-num-prompts) HF_NUM_PROMPTS=$2; shift 2 ;;
    --skip-hf) SKIP_HF=1; shift ;;
    --engine-args) ENGINE_ARGS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

# shellcheck source=benchmarks/common.sh
source benchmarks/common.sh

start_log bench.log

step ceilings 60 python3 -m folovllm.bench.floor --output-json "$OUT/ceilings.json"
# shellcheck disable=SC2086
step throughput_folovllm 200 $FOLO bench throughput $ENGINE_ARGS --output-json "$OUT/throughput_folovllm.json"
# The same engine stepping synchronously (no async scheduling), to show what the overlap is worth.
# shellcheck disable=SC2086
step throughput_folovllm_sync 200 $FOLO bench throughput $ENGINE_ARGS --no-async-scheduling \
  --output-json "$OUT/throughput_folovllm_sync.json"
if [ "$SKIP_HF" = 0 ]; then
  step throughput_hf 330 $FOLO bench throughput --backend hf --num-prompts "$HF_NUM_PROMPTS" \
    --output-json "$OUT/throughput_hf.json"
fi
# shellcheck disable=SC2086
step latency_folovllm 200 $FOLO bench latency $ENGINE_ARGS --output-json "$OUT/latency_folovllm.json"
if [ "$SKIP_HF" = 0 ]; then
  step latency_hf 90 $FOLO bench latency --backend hf --batch-sizes 1 --output-json "$OUT/latency_hf.json"
fi

FILES="$OUT/ceilings.json $OUT/throughput_folovllm.json $OUT/throughput_folovllm_sync.json $OUT/latency_folovllm.json"
[ "$SKIP_HF" = 0 ] && FILES="$FILES $OUT/throughput_hf.json $OUT/latency_hf.json"
echo | tee -a "$LOG"
# shellcheck disable=SC2086
$FOLO bench table $FILES 2>&1 | tee "$OUT/table.txt" | tee -a "$LOG"
