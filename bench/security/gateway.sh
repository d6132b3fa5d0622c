#!/usr/bin/env bash
# HTTPS vs plain HTTP on the gateway's listener, same machine, same binary: `flotilla gateway`
# (release) in front of 4 fixed-response nginx backends (bench/gateway's), wrk POSTing a
# small /v1/completions at CONNS keep-alive connections, alternating plain and HTTPS gateways
# ROUNDS times so drift hits both. The certificate is `flotilla tls cert create --role
# gateway` (ECDSA P-256, as rcgen makes it). With PIN=1 (the default) this is the peers-style
# overhead harness of bench/gateway: the gateway pinned to CPU 0, wrk and nginx to CPU 1, so
# the client's own TLS work does not eat into the gateway's core. Prints a table and writes
# bench/security/gateway-results.json. Everything it starts is killed on exit.
#
# Needs: wrk and nginx (apt-get install wrk nginx-light), jq.
# Knobs (environment): ROUNDS (3), DURATION (s, 10), CONNS (64), PIN (1; 0 lets everything
# share both cores), TARGET_DIR (cargo target dir, <repo>/target-bench), SKIP_BUILD=1.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
PIN=${PIN:-1}
pin_cpus
GW_CPU=("${PIN0[@]}") CLIENT_CPU=("${PIN1[@]}")
require wrk nginx jq curl
build
warn_busy
workdir gwtls

sed "s|@DIR@|$WORK|g" "$ROOT/bench/gateway/nginx.conf.in" >"$WORK/nginx.conf"
"${CLIENT_CPU[@]}" nginx -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)
(cd "$WORK" && "$FLOTILLA" tls ca create --dir tls >/dev/null &&
  "$FLOTILLA" tls cert create --ca-dir tls --dir tls --role gateway --name gw --ip 127.0.0.1 >/dev/null)

wait_url() { for _ in $(seq 1 200); do curl -sk -o /dev/null "$1" && return 0; sleep 0.1; done; log "$1 never answered"; return 1; }
wait_url http://127.0.0.1:18001/health

run_one() { # mode round -> one JSON line
  local mode=$1 port=19100 scheme=http tls=()
  if [[ $mode == https ]]; then
    scheme=https
    tls=(--https-cert "$WORK/tls/gateway-gw.pem" --https-key "$WORK/tls/gateway-gw-key.pem")
  fi
  "${GW_CPU[@]}" "$FLOTILLA" --server '' gateway --listen "127.0.0.1:$port" --no-auth --scrape-interval-ms 0 \
    --backend bench=http://127.0.0.1:18001 --backend bench=http://127.0.0.1:18002 \
    --backend bench=http://127.0.0.1:18003 --backend bench=http://127.0.0.1:18004 \
    "${tls[@]}" >"$WORK/gw-$mode.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait_url "$scheme://127.0.0.1:$port/healthz"
  local out
  out=$("${CLIENT_CPU[@]}" wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$ROOT/bench/gateway/post.lua" "$scheme://127.0.0.1:$port/v1/completions")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local rps p50 p99 errs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  jq -cn --arg mode "$mode" --argjson round "$2" --argjson rps "$rps" --arg p50 "$p50" --arg p99 "$p99" --arg errs "$errs" \
    '{mode:$mode, round:$round, rps:$rps, p50:$p50, p99:$p99, errors:$errs}'
}

: >"$WORK/runs.jsonl"
for round in $(seq 1 "$ROUNDS"); do
  for mode in plain https; do
    log "round $round: $mode"
    run_one "$mode" "$round" | tee -a "$WORK/runs.jsonl" >&2
  done
done
jq -s '{conns: '"$CONNS"', pinned: '"$PIN"', duration_s: '"$DURATION"', runs: .,
  mean: (group_by(.mode) | map({key: .[0].mode, value: (map(.rps) | add / length)}) | from_entries)}' \
  "$WORK/runs.jsonl" >"$HERE/gateway-results.json"
printf '| mode | round | req/s | p50 | p99 |\n|---|---|---|---|---|\n'
jq -r '.runs[] | "| \(.mode) | \(.round) | \(.rps) | \(.p50) | \(.p99) |"' "$HERE/gateway-results.json"
jq -r '"mean: plain \(.mean.plain | floor) req/s, https \(.mean.https | floor) req/s, https / plain \((.mean.https / .mean.plain * 100 | floor) / 100)"' "$HERE/gateway-results.json"
