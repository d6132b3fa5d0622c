#!/usr/bin/env bash
# Gateway -> engine TLS vs plain HTTP, same machine, same binary: one `flotilla server`, one
# `flotilla agent` running one sim engine (`--engine-tls off`, then `on`: the engine serves
# HTTPS with the agent's self-signed certificate and the gateway pins it), and `flotilla
# gateway` following the endpoint table. wrk POSTs a one-token /v1/completions, first on one
# connection (the latency each request pays), then on CONNS keep-alive connections (req/s);
# the modes alternate ROUNDS times so drift hits both. The sim runs at --speedup 1000, so the
# engine's simulated compute is microseconds and the HTTP path is what is measured. Prints a
# table and writes bench/security/engine-tls-results.json. PIN=1 runs the gateway pinned to
# CPU 0 and everything else (server, agent, engine, wrk) on CPU 1; off by default, because
# there the engine's side of the TLS link, on the crowded core, is what saturates first.
# Everything it starts is killed on exit.
#
# Needs: wrk, jq, curl. Knobs (environment): ROUNDS (3), DURATION (s, 10), CONNS (64), PIN (0),
# TARGET_DIR (cargo target dir, <repo>/target-bench), SKIP_BUILD=1.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
PIN=${PIN:-0}
pin_cpus
GW_CPU=("${PIN0[@]}") REST_CPU=("${PIN1[@]}")
require wrk jq curl
build
F=$FLOTILLA
warn_busy
workdir enginetls

GRPC=127.0.0.1:17370
GW=127.0.0.1:19370
RUST_LOG=warn "${REST_CPU[@]}" "$F" server --id 1 --bootstrap --grpc-addr "$GRPC" --http-addr 127.0.0.1:17371 \
  --data-dir "$WORK/server" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do "$F" --server "$GRPC" cluster status >/dev/null 2>&1 && break; sleep 0.1; done
RUST_LOG=warn "${GW_CPU[@]}" "$F" --server "$GRPC" gateway --listen "$GW" --no-auth >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
cat >"$WORK/model.yaml" <<'EOF'
kind: Model
metadata:
  name: bench
spec:
  engine: sim
  source: file:///models/bench
  replicas: 1
  gpus: 1
EOF
cat >"$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"bench","prompt":"hello","max_tokens":1}'
wrk.headers["Content-Type"] = "application/json"
EOF
BODY='{"model":"bench","prompt":"hello","max_tokens":1}'

# mode round -> starts an agent (a node of its own) with --engine-tls mode, applies the model,
# waits until the gateway serves it
up() {
  NODE=bench-$1-$2
  RUST_LOG=warn "${REST_CPU[@]}" "$F" --server "$GRPC" agent --node-name "$NODE" --data-dir "$WORK/$NODE" \
    --gpus 1 --gpu-type A100-80GB --engine-tls "$1" --stop-engines-on-exit \
    --sim-args "--speedup 1000" >"$WORK/$NODE.log" 2>&1 &
  AGENT=$!
  PIDS+=("$AGENT")
  "$F" --server "$GRPC" apply -f "$WORK/model.yaml" >/dev/null
  local ok=0
  for _ in $(seq 1 300); do
    [[ $(curl -s -m 2 -o /dev/null -w '%{http_code}' -H 'content-type: application/json' -d "$BODY" "http://$GW/v1/completions") == 200 ]] && { ok=1; break; }
    sleep 0.1
  done
  [[ $ok == 1 ]] || { log "the gateway never served the model ($NODE)"; tail -n 20 "$WORK/$NODE.log" "$WORK/gateway.log" >&2; "$F" --server "$GRPC" get replica >&2; return 1; }
  # the replica carries a certificate pin exactly when the engine serves TLS
  local pinned=off
  "$F" --server "$GRPC" get replica -o json |
    jq -e '[if type == "array" then .[] else . end | select(.status.phase == "Ready" and .status.engine_cert_sha256)] | length > 0' \
      >/dev/null && pinned=on
  [[ $pinned == "$1" ]] || { log "engine TLS $1 but the replica's pin says $pinned"; return 1; }
}
down() {
  "$F" --server "$GRPC" delete model bench >/dev/null
  "$F" --server "$GRPC" node cordon "$NODE" >/dev/null # the next round's replica goes to the next node
  kill "$AGENT" 2>/dev/null || true
  wait "$AGENT" 2>/dev/null || true
  # the gateway must lose the endpoint before the next mode's appears
  for _ in $(seq 1 100); do
    [[ $(curl -s -m 2 -o /dev/null -w '%{http_code}' -H 'content-type: application/json' -d "$BODY" "http://$GW/v1/completions") != 200 ]] && return 0
    sleep 0.1
  done
}

wrk_json() { # mode round conns -> one JSON line
  local out rps p50 p99 errs
  out=$("${REST_CPU[@]}" wrk -t"$(( $3 < 2 ? 1 : 2 ))" -c"$3" -d"${DURATION}s" --latency -s "$WORK/post.lua" "http://$GW/v1/completions")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  jq -cn --arg mode "$1" --argjson round "$2" --argjson conns "$3" --argjson rps "$rps" --arg p50 "$p50" \
    --arg p99 "$p99" --arg errs "$errs" '{mode:$mode, round:$round, conns:$conns, rps:$rps, p50:$p50, p99:$p99, errors:$errs}'
}

: >"$WORK/runs.jsonl"
for round in $(seq 1 "$ROUNDS"); do
  for mode in off on; do
    log "round $round: engine TLS $mode"
    up "$mode" "$round"
    wrk_json "$mode" "$round" 1 | tee -a "$WORK/runs.jsonl" >&2
    wrk_json "$mode" "$round" "$CONNS" | tee -a "$WORK/runs.jsonl" >&2
    down
  done
done
jq -s '{duration_s: '"$DURATION"', runs: .,
  mean: (group_by([.mode, .conns]) | map({key: "\(.[0].mode)-c\(.[0].conns)", value: (map(.rps) | add / length)}) | from_entries)}' \
  "$WORK/runs.jsonl" >"$HERE/engine-tls-results.json"
printf '| engine TLS | round | conns | req/s | p50 | p99 |\n|---|---|---|---|---|---|\n'
jq -r '.runs[] | "| \(.mode) | \(.round) | \(.conns) | \(.rps) | \(.p50) | \(.p99) |"' "$HERE/engine-tls-results.json"
jq -r '.mean | to_entries[] | "mean \(.key): \(.value | floor) req/s"' "$HERE/engine-tls-results.json"
