#!/usr/bin/env bash
# Gateway overhead benchmark (issue 6, benchmark 1): 4 fixed-response backends (nginx),
# wrk with 64 connections for DURATION seconds each, in one run: direct to one backend,
# flotilla (least-request), vllm-router and sglang-router (round_robin and cache_aware).
# Needs: wrk and nginx (apt-get install wrk nginx-light), a release build of the gateway
# example, and a venv with vllm-router and sglang-router (PyPI):
#   python3 -m venv /tmp/benchvenv/venv && /tmp/benchvenv/venv/bin/pip install vllm-router sglang-router  (or BENCH_VENV=...)
#   CARGO_TARGET_DIR=target-gw cargo build --release -p flotilla-gateway --example gateway
# Usage: bash bench/gateway/run.sh [DURATION] > results.txt   (CONNS=1 for unloaded latency)
# Benchmark 2 (routing quality, 4 sims, flotilla vs the peers' cache_aware/round_robin) is
# gateway/examples/routing_bench.rs; see RESULTS.md for its command line.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
DUR=${1:-15}
CONNS=${CONNS:-64}
THREADS=$(( CONNS < 2 ? 1 : 2 ))
VENV=${BENCH_VENV:-/tmp/benchvenv/venv}
GW=${GATEWAY_BIN:-$ROOT/target-gw/release/examples/gateway}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
BACKENDS=(http://127.0.0.1:18001 http://127.0.0.1:18002 http://127.0.0.1:18003 http://127.0.0.1:18004)

sed "s|@DIR@|$WORK|g" "$HERE/nginx.conf.in" > "$WORK/nginx.conf"
nginx -c "$WORK/nginx.conf" -p "$WORK" & PIDS+=($!)

wait_port() { for _ in $(seq 1 200); do curl -s -o /dev/null "http://127.0.0.1:$1/health" && return 0; sleep 0.1; done; echo "port $1 never answered" >&2; return 1; }
wait_port 18001

run_wrk() { # name port
  local out
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"${DUR}s" --latency -s "$HERE/post.lua" "http://127.0.0.1:$2/v1/completions")
  local rps p50 p99 errs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  printf '%-28s %10s %10s %10s  %s\n' "$1" "$rps" "$p50" "$p99" "$errs"
}

stop_last() { kill "${PIDS[-1]}" 2>/dev/null || true; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; sleep 0.5; }

echo "# $CONNS connections, $DUR s per target, $(nproc) cores"
printf '%-28s %10s %10s %10s\n' target req/s p50 p99
run_wrk "direct (one backend)" 18001

"$GW" --listen 127.0.0.1:19000 --no-auth --scrape-interval-ms 0 \
  $(for b in "${BACKENDS[@]}"; do printf -- '--backend bench=%s ' "$b"; done) > "$WORK/gw.log" 2>&1 & PIDS+=($!)
wait_port 19000
run_wrk "flotilla least-request" 19000
stop_last

for policy in round_robin cache_aware; do
  "$VENV/bin/vllm-router" --host 127.0.0.1 --port 19001 --worker-urls "${BACKENDS[@]}" --policy "$policy" \
    --prometheus-port 29101 --log-level error > "$WORK/vllm-router.log" 2>&1 & PIDS+=($!)
  wait_port 19001
  run_wrk "vllm-router $policy" 19001
  stop_last
  "$VENV/bin/sglang-router" launch --host 127.0.0.1 --port 19002 --worker-urls "${BACKENDS[@]}" --policy "$policy" \
    --prometheus-port 29102 --log-level error > "$WORK/sglang-router.log" 2>&1 & PIDS+=($!)
  wait_port 19002
  run_wrk "sglang-router $policy" 19002
  stop_last
done
