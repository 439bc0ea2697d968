#!/usr/bin/env bash
# The serve workload of BENCHMARKS.md in one GPU run, from the repository root:
#   bash benchmarks/serve_comparison.sh [--engine-args "FLAGS"] [--num-prompts N]
# 1. offline: the same 500 requests through LLM.generate (bench throughput --workload serve);
# 2. `folovllm serve` on 127.0.0.1 with dummy Qwen3-0.6B, the engine core in a thread and then in a
#    process of its own; `folovllm bench serve` at
#    saturation (--request-rate inf), at 25%, 50% and 75% of the request rate reached there, and
#    with 256 concurrent clients;
# each serve run also records the CPU seconds the server process spent (all its threads) and the
# client's, so a shortfall can be put on the HTTP side or the engine's. JSON under ${OUT:-/tmp/out},
# one log, a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."

ENGINE_ARGS=""
NUM_PROMPTS=500
PORT=8011
while [ $# -gt 0 ]; do
  case "$1" in
    --engine-args) ENGINE_ARGS=$2; shift 2 ;;
    --num-prompts) NUM_PROMPTS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

# shellcheck source=benchmarks/common.sh
source benchmarks/common.sh
MODEL=${MODEL:-benchmarks/configs/qwen3-0.6b}
URL=http://127.0.0.1:$PORT

start_log serve.log

echo "=== offline ($(date +%T))" | tee -a "$LOG"
# shellcheck disable=SC2086
timeout 200 $FOLO bench throughput --model "$MODEL" --workload serve --num-prompts "$NUM_PROMPTS" --input-len-range 100,1024 \
  --output-len-range 100,512 --temperature 0 $ENGINE_ARGS --output-json "$OUT/offline.json" 2>&1 | tee -a "$LOG"

cpu_s() { python3 -c "import psutil,sys; p=psutil.Process(int(sys.argv[1])); ps=[p]+p.children(recursive=True); print(sum(t.user+t.system for t in (q.cpu_times() for q in ps)))" "$1"; }

bench() {  # bench NAME ARGS...: one bench serve run with the server's (and its children's) and the client's CPU time
  local name=$1; shift
  echo "=== $name ($(date +%T)): $*" | tee -a "$LOG"
  local before; before=$(cpu_s $SERVER)
  local t0; t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  /usr/bin/time -f "%U %S" -o "$OUT/$name.client_cpu" timeout 300 $FOLO bench serve --base-url "$URL" \
    --num-prompts "$NUM_PROMPTS" --no-progress --output-json "$OUT/$name.json" "$@" 2>&1 | tee -a "$LOG"
  local after; after=$(cpu_s $SERVER)
  python3 - "$OUT/$name.json" "$before" "$after" "$OUT/$name.client_cpu" "$t0" <<'EOF2' | tee -a "$LOG"
import json, sys, time
path, before, after, client, t0 = sys.argv[1:]
r = json.load(open(path))
u, s = open(client).read().split()[-2:]
r.update(server_cpu_s=float(after) - float(before), client_cpu_s=float(u) + float(s),
         span_s=time.time() - float(t0))
json.dump(r, open(path, "w"), indent=1)
print(f"  server CPU {r['server_cpu_s']:.1f} s, client CPU {r['client_cpu_s']:.1f} s over {r['wall_s']:.1f} s timed")
EOF2
}

start_server() {  # start_server MODE
  echo "=== server, engine core in a $1 ($(date +%T))" | tee -a "$LOG"
  # shellcheck disable=SC2086
  $FOLO serve "$MODEL" --load-format dummy --port "$PORT" --engine-core "$1" $ENGINE_ARGS >"$OUT/server_$1.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 240); do
    curl -sf "$URL/health" >/dev/null 2>&1 && break
    kill -0 $SERVER 2>/dev/null || { echo "server died" | tee -a "$LOG"; tail -30 "$OUT/server_$1.log"; return 1; }
    sleep 0.5
  done
  grep -E "ready|serving" "$OUT/server_$1.log" | tail -3 | tee -a "$LOG"
}

stop_server() {
  curl -s "$URL/metrics" | grep -E "^vllm:(num_requests_running|kv_cache_usage_perc|num_preemptions_total|request_success_total)" | tee -a "$LOG"
  kill -TERM $SERVER; local t0=$SECONDS; wait $SERVER; echo "server exited rc=$? after $((SECONDS - t0)) s" | tee -a "$LOG"
  sleep 2
  pgrep -f "folovllm serve|multiprocessing.spawn" >/dev/null && { echo "LEFT BEHIND:"; pgrep -af "folovllm serve|multiprocessing.spawn"; } | tee -a "$LOG"
}

# The core in a thread of the server process: saturation and 256 clients only.
if start_server thread; then
  bench thread_inf --request-rate inf
  bench thread_conc256 --request-rate inf --max-concurrency 256 --num-prompts "${CONC_PROMPTS:-768}"
  stop_server
fi
# The core in its own process (the default): saturation, three rates below it, 256 clients.
if start_server process; then
  bench inf --request-rate inf
  SAT=$(python3 -c "import json; print(json.load(open('$OUT/inf.json'))['request_throughput'])")
  for f in 0.25 0.5 0.75; do
    R=$(python3 -c "print(round($SAT * $f, 1))")
    bench "rate_$f" --request-rate "$R"
  done
  bench conc256 --request-rate inf --max-concurrency 256 --num-prompts "${CONC_PROMPTS:-768}"
  stop_server
fi

echo | tee -a "$LOG"
python3 - "$OUT" <<'EOF' | tee "$OUT/table.txt" | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
off = json.load(open(os.path.join(out, "offline.json")))
print(f"offline: {off['num_requests']} requests, {off['output_tokens']:,} output tokens in {off['wall_s']:.2f} s = "
      f"{off['output_tokens_per_s']:,.0f} output tok/s")
print(f"{'run':<15} {'rate':>7} {'conc':>5} {'ok/fail':>8} {'out tok/s':>10} {'vs off':>7} {'TTFT p50/p99 ms':>16} "
      f"{'TPOT p50/p99':>13} {'ITL p50/p99':>13} {'srv CPU':>8} {'cli CPU':>8}")
for name in ("thread_inf", "thread_conc256", "inf", "rate_0.75", "rate_0.5", "rate_0.25", "conc256"):
    try:
        r = json.load(open(os.path.join(out, name + ".json")))
    except (OSError, ValueError):
        print(f"{name:<15} no result"); continue
    rate = "inf" if r["request_rate"] == float("inf") else f"{r['request_rate']:.1f}"
    t, p, i = r["ttft_ms"], r["tpot_ms"], r["itl_ms"]
    print(f"{name:<15} {rate:>7} {str(r['max_concurrency'] or '-'):>5} {r['completed']:>4}/{r['failed']:<3} "
          f"{r['output_tokens_per_s']:>10,.0f} {r['output_tokens_per_s'] / off['output_tokens_per_s']:>6.1%} "
          f"{t['median']:>7.1f}/{t['p99']:<8.1f} {p['median']:>5.2f}/{p['p99']:<7.2f} {i['median']:>5.2f}/{i['p99']:<7.2f} "
          f"{r['server_cpu_s']:>7.1f}s {r['client_cpu_s']:>7.1f}s")
EOF
