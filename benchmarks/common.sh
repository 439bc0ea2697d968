# Sourced by the GPU comparison scripts: the environment they share; start_log FILE, which makes
# $OUT, sets LOG=$OUT/FILE and writes the device, commit and date to it; and step NAME LIMIT_S
# COMMAND..., which runs one step with a time limit (so a stuck step cannot eat the others' time)
# and logs its output and exit code to $LOG; tstep NAME LIMIT_S COMMAND..., the same with the
# limit cut to what is left of TOTAL_S (a device call's limit) less RESERVE_S for the table at the
# end, skipped when less than 15 s would be left.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
FOLO="python3 -m folovllm"
TOTAL_S=${TOTAL_S:-540}
RESERVE_S=${RESERVE_S:-20}

start_log() {
  LOG=$OUT/$1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    git rev-parse --short HEAD 2>/dev/null; date -u; } 2>&1 | tee "$LOG"
}

step() {
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit} s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

tstep() {
  local name=$1 limit=$2 left=$((TOTAL_S - RESERVE_S - SECONDS)); shift 2
  if (( left < limit )); then limit=$left; fi
  if (( limit < 15 )); then
    echo "=== $name: skipped, $left s left of TOTAL_S=$TOTAL_S" | tee -a "$LOG"
    return
  fi
  step "$name" "$limit" "$@"
}
