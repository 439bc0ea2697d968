#!/usr/bin/env bash
# BENCHMARKS.md's gptq workload in one GPU run, from the repository root:
#   bash benchmarks/gptq_comparison.sh
# the kernel against cuBLAS bf16 per Qwen3-8B projection and batch size, then the engine on
# Qwen3-8B shapes with dummy weights, bf16 (benchmarks/configs/qwen3-8b) against 4-bit g128
# (benchmarks/configs/qwen3-8b-gptq: the same config with a quantization_config, so the dummy
# weights are GPTQ tensors): latency at batch 1 and 16 and the throughput workload, and the GPTQ
# kernel's GPU tests. JSON under ${OUT:-/tmp/out}, one log, the table last.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/common.sh
source benchmarks/common.sh

start_log gptq.log

step kernel_tests 150 python3 -m pytest -q -x tests/unit/test_gptq_triton.py tests/unit/test_gptq_linear.py
step gemm 120 python3 benchmarks/bench_gptq_gemm.py
for m in qwen3-8b qwen3-8b-gptq; do
  step "latency_$m" 150 $FOLO bench latency --model "benchmarks/configs/$m" --batch-sizes 1,16 \
    --output-json "$OUT/latency_$m.json"
  step "throughput_$m" 200 $FOLO bench throughput --model "benchmarks/configs/$m" \
    --output-json "$OUT/throughput_$m.json"
done
echo | tee -a "$LOG"
# shellcheck disable=SC2086
$FOLO bench table "$OUT"/latency_*.json "$OUT"/throughput_*.json 2>&1 | tee "$OUT/table.txt" | tee -a "$LOG"
