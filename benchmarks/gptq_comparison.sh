#!/usr/bin/env bash
# BENCHMARKS.md's gptq workload in one GPU run, from the repository root:
#   bash benchmarks/gptq_comparison.sh
# the engine on Qwen3-8B shapes with dummy weights, bf16 (benchmarks/configs/qwen3-8b) against
# 4-bit g128 (benchmarks/configs/qwen3-8b-gptq: the same config with a quantization_config, so the
# dummy weights are GPTQ tensors): latency at batch 1 and 16 and the throughput workload; then the
# GPTQ GPU tests and the kernel against cuBLAS bf16 per projection and batch size; every step has a time limit and the whole run stays within TOTAL_S
# (default 540 s, one device call). JSON under ${OUT:-/tmp/out}, one log, the table last.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/common.sh
source benchmarks/common.sh

start_log gptq.log

# Engines first (the bars), then the GPU tests and the kernel table with what is left of TOTAL_S.
rm -f "$OUT"/latency_qwen3-8b*.json "$OUT"/throughput_qwen3-8b*.json
for m in qwen3-8b-gptq qwen3-8b; do
  tstep "latency_$m" 100 $FOLO bench latency --model "benchmarks/configs/$m" --batch-sizes 1,16 \
    --output-json "$OUT/latency_$m.json"
  tstep "throughput_$m" 120 $FOLO bench throughput --model "benchmarks/configs/$m" \
    --output-json "$OUT/throughput_$m.json"
done
tstep gpu_tests 90 python3 -m pytest -q tests/gpu/test_gptq_gpu.py
tstep kernel_tests 90 env FOLOVLLM_GPTQ_CUDA=1 python3 -m pytest -q tests/unit/test_gptq_triton.py \
  -k "swap or share_one or ragged or every_unpacking or gemv_kernel or dequantize_then or qwen3_8b"
tstep gemm 90 python3 benchmarks/bench_gptq_gemm.py --rows 1 4 16 64 256
echo | tee -a "$LOG"
# shellcheck disable=SC2086
$FOLO bench table "$OUT"/latency_*.json "$OUT"/throughput_*.json 2>&1 | tee "$OUT/table.txt" | tee -a "$LOG"
