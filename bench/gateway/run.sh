#!/usr/bin/env bash
# Gateway overhead: the shipped `flotilla gateway` vs vllm-router (and sglang-router) in front of 4 fixed-response nginx backends.
# The peers-style harness (issue 25): the router pinned to CPU 0, wrk and nginx to CPU 1, wrk
# POSTing a small /v1/completions over CONNS keep-alive connections for DURATION s, targets
# alternating ROUNDS times so drift hits all. For each target: req/s, latency p50/p99, and
# the router's CPU per request (its utime+stime from /proc over the run / requests served).
# Then, below saturation (LOW_CONNS connections), the latency each router adds over going
# straight to one backend. Prints a table and writes one JSON line per measurement to OUT
# (default runs-<UTC time>.jsonl in bench/run's output directory, else bench/gateway/out/).
# Everything it starts is killed on exit.
#
# Needs: wrk and nginx (apt-get install wrk nginx-light), jq, curl; for the peers a venv with
# vllm-router and sglang-router (PyPI):
#   python3 -m venv /tmp/benchvenv/venv && /tmp/benchvenv/venv/bin/pip install vllm-router sglang-router
# Knobs (environment): ROUNDS (3), DURATION (s, 10), CONNS (64), LOW_CONNS (1; 0 skips),
# PEERS ("vllm-router sglang-router"; those not installed are skipped, named), BENCH_VENV
# (/tmp/benchvenv/venv), PIN (1; 0 lets everything share both cores), FLOTILLA_BIN or
# TARGET_DIR/SKIP_BUILD as bench/security's, OUT.
# Routing quality (4 sims, flotilla vs the peers' cache_aware/round_robin) is bench/routing.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/../security/common.sh"
FLOTILLA=${FLOTILLA_BIN:-$FLOTILLA}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
LOW_CONNS=${LOW_CONNS:-1}
PIN=${PIN:-1}
VENV=${BENCH_VENV:-/tmp/benchvenv/venv}
OUT=${OUT:-${BENCH_OUT:-$HERE/out}/runs-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
pin_cpus
ROUTER_CPU=("${PIN0[@]}") CLIENT_CPU=("${PIN1[@]}")
require wrk nginx jq curl
[[ -n ${FLOTILLA_BIN:-} ]] || build
warn_busy
workdir gwbench
mkdir -p "$(dirname "$OUT")"
BACKENDS=(http://127.0.0.1:18001 http://127.0.0.1:18002 http://127.0.0.1:18003 http://127.0.0.1:18004)
PORT=19000

targets=(flotilla)
for peer in ${PEERS-vllm-router sglang-router}; do
  if [[ -x $VENV/bin/$peer ]]; then targets+=("$peer"); else log "skipping $peer: $VENV/bin/$peer not installed"; fi
done

sed "s|@DIR@|$WORK|g" "$HERE/nginx.conf.in" >"$WORK/nginx.conf"
"${CLIENT_CPU[@]}" nginx -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)

wait_url() { for _ in $(seq 1 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; log "$1 never answered"; return 1; }
wait_url http://127.0.0.1:18001/health

start_router() { # target -> pid in ROUTER
  case $1 in
    flotilla)
      "${ROUTER_CPU[@]}" "$FLOTILLA" --server '' gateway --listen "127.0.0.1:$PORT" --no-auth --scrape-interval-ms 0 \
        $(for b in "${BACKENDS[@]}"; do printf -- '--backend bench=%s ' "$b"; done) >"$WORK/flotilla.log" 2>&1 &
      ;;
    vllm-router)
      "${ROUTER_CPU[@]}" "$VENV/bin/vllm-router" --host 127.0.0.1 --port "$PORT" --worker-urls "${BACKENDS[@]}" \
        --policy round_robin --prometheus-port 29101 --log-level error >"$WORK/vllm-router.log" 2>&1 &
      ;;
    sglang-router)
      "${ROUTER_CPU[@]}" "$VENV/bin/sglang-router" launch --host 127.0.0.1 --port "$PORT" --worker-urls "${BACKENDS[@]}" \
        --policy round_robin --prometheus-port 29102 --log-level error >"$WORK/sglang-router.log" 2>&1 &
      ;;
  esac
  ROUTER=$!
  PIDS+=("$ROUTER")
  wait_url "http://127.0.0.1:$PORT/$([[ $1 == flotilla ]] && echo healthz || echo health)"
}

stop_router() { kill "$ROUTER" 2>/dev/null || true; wait "$ROUTER" 2>/dev/null || true; sleep 0.5; }

# CPU seconds (user + system) of a process and its threads so far.
cpu_s() { awk -v t="$(getconf CLK_TCK)" '{print ($14 + $15) / t}' "/proc/$1/stat"; }

measure() { # target round conns url [pid] -> one JSON line
  local target=$1 round=$2 conns=$3 url=$4 pid=${5:-} before=0 after=0 out
  [[ -n $pid ]] && before=$(cpu_s "$pid")
  out=$("${CLIENT_CPU[@]}" wrk -t"$((conns < 2 ? 1 : 2))" -c"$conns" -d"${DURATION}s" --latency -s "$HERE/post.lua" "$url")
  [[ -n $pid ]] && after=$(cpu_s "$pid")
  local rps p50 p99 reqs errs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  jq -cn --arg target "$target" --argjson round "$round" --argjson conns "$conns" --argjson rps "$rps" \
    --argjson reqs "$reqs" --arg p50 "$p50" --arg p99 "$p99" --arg errs "$errs" \
    --argjson cpu "$(python3 -c "print($after - $before)")" --arg commit "$(git -C "$ROOT" rev-parse --short HEAD)" \
    --argjson pinned "$PIN" \
    '{target:$target, round:$round, conns:$conns, rps:$rps, requests:$reqs, p50:$p50, p99:$p99, errors:$errs,
      router_cpu_s:$cpu, cpu_us_per_request:(if $cpu > 0 then ($cpu / $reqs * 1e6 | . * 10 | round / 10) else null end),
      commit:$commit, pinned:$pinned}'
}

log "targets: ${targets[*]}; $CONNS connections, $DURATION s each, $ROUNDS rounds, pinned=$PIN; out: $OUT"
for round in $(seq 1 "$ROUNDS"); do
  # each round starts with the next target, so none always runs first or last
  n=${#targets[@]}
  for k in $(seq 0 $((n - 1))); do
    target=${targets[$(((round - 1 + k) % n))]}
    start_router "$target"
    measure "$target" "$round" "$CONNS" "http://127.0.0.1:$PORT/v1/completions" "$ROUTER" | tee -a "$OUT" >&2
    stop_router
  done
done
if (( LOW_CONNS > 0 )); then
  measure direct 1 "$LOW_CONNS" "http://127.0.0.1:18001/v1/completions" | tee -a "$OUT" >&2
  for target in "${targets[@]}"; do
    start_router "$target"
    measure "$target" 1 "$LOW_CONNS" "http://127.0.0.1:$PORT/v1/completions" "$ROUTER" | tee -a "$OUT" >&2
    stop_router
  done
fi

echo
echo "# $(nproc) cores, pinned=$PIN, $DURATION s per measurement; $OUT"
printf '| target | connections | req/s (mean of rounds) | CPU µs / request | p50 | p99 |\n|---|---:|---:|---:|---:|---:|\n'
jq -rs 'group_by([.target, .conns]) | map({t: .[0].target, c: .[0].conns, rps: (map(.rps) | add / length),
    cpu: (map(.cpu_us_per_request) | map(select(. != null)) | if length > 0 then add / length else null end),
    p50: (map(.p50) | join(" ")), p99: (map(.p99) | join(" "))})
  | sort_by(-.c, -.rps) | .[] | "| \(.t) | \(.c) | \(.rps | floor) | \(if .cpu then (.cpu * 10 | round / 10) else "-" end) | \(.p50) | \(.p99) |"' "$OUT"
