#!/usr/bin/env bash
# The global gateway tier (issue 26): what it adds to a request, and failover when a member
# dies under load. Everything runs on this machine, on loopback:
#   a federation server (flotilla server --federation) holding two Clusters, eu-west and
#   us-east, whose gateways are `flotilla sim` processes serving model `bench`;
#   the global gateway (flotilla gateway --federation ... --region eu-west) in front of them.
# 1. Added latency: wrk POSTs a one-token chat completion over CONNS keep-alive connections
#    for DURATION s, alternately straight to the eu-west sim and through the global gateway
#    (which sends it to that same sim), ROUNDS times; p50/p99 (wrk --latency) and req/s each.
#    With nginx installed, the same against a fixed-response nginx (a third Cluster, `fixed`,
#    serving model bench-fixed): straight, through the global gateway, and through a cluster
#    gateway (--backend) for scale, which isolates the tiers' own cost from the sim's.
# 2. Failover: failover.py runs THREADS closed-loop clients through the global gateway and
#    SIGKILLs the eu-west sim (the preferred member) KILL_AT s in: requests that failed (goal
#    0), the wait of those in flight at the kill, the time until us-east answered.
# 3. Propagation (PROPAGATION=1, the default): propagation.sh, one FederatedModel change to
#    MEMBERS (10) member clusters (its header says how), results beside OUT.
# Prints a table and writes one JSON object per measurement to OUT (default
# bench/federation/out/run-<UTC time>/latency-failover.jsonl;
# under bench/run, its output directory). Everything it starts is killed on exit.
#
# Needs: wrk, curl, jq, python3 (nginx optional). Knobs (environment): ROUNDS (2), DURATION (s, 4), CONNS
# ("1 16"), SPEEDUP (sim speed-up, 100), THREADS (8), PIN (1: the global gateway on CPU 0,
# everything else on CPU 1; 0 shares both), FLOTILLA_BIN or TARGET_DIR/SKIP_BUILD as
# bench/security's (release build), NGINX (1 when installed; 0 skips), OUT, PROPAGATION,
# MEMBERS, TRIALS (propagation.sh's). Bounded: under
# 2 minutes with the defaults.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/../security/common.sh"
FLOTILLA=${FLOTILLA_BIN:-$FLOTILLA}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-4}
CONNS=${CONNS:-1 16}
SPEEDUP=${SPEEDUP:-100}
PIN=${PIN:-1}
OUT=${OUT:-${BENCH_OUT:-$HERE/out/run-$(date -u +%Y%m%dT%H%M%SZ)}/latency-failover.jsonl}
pin_cpus
GW_CPU=("${PIN0[@]}") REST_CPU=("${PIN1[@]}")
require wrk curl jq python3
[[ -n ${FLOTILLA_BIN:-} ]] || build
warn_busy
workdir fedbench
mkdir -p "$(dirname "$OUT")"

banner() { # LOG PATTERN: waits for PATTERN's first line in LOG and prints it
  for _ in $(seq 1 400); do grep -m1 -- "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  log "no \"$2\" in $1:"; cat "$1" >&2; return 1
}

"${REST_CPU[@]}" "$FLOTILLA" server --federation --bootstrap --id 1 --data-dir "$WORK/fed" \
  --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$WORK/fed.log" 2>&1 &
PIDS+=($!)
FED=$(banner "$WORK/fed.log" "grpc=" | sed -E 's/.*grpc=([^ ]+).*/\1/')

"${REST_CPU[@]}" "$FLOTILLA" sim --port 0 --model bench --speedup "$SPEEDUP" >"$WORK/eu.log" 2>&1 &
EU_PID=$!; PIDS+=($EU_PID)
"${REST_CPU[@]}" "$FLOTILLA" sim --port 0 --model bench --speedup "$SPEEDUP" >"$WORK/us.log" 2>&1 &
PIDS+=($!)
EU=$(banner "$WORK/eu.log" "listening on" | sed -E 's|.*http://([^ ]+).*|\1|')
US=$(banner "$WORK/us.log" "listening on" | sed -E 's|.*http://([^ ]+).*|\1|')

cluster() { printf 'kind: Cluster\nmetadata: {name: %s, labels: {region: %s}}\nspec: {servers: ["127.0.0.1:1"], gateway: "http://%s"}\n---\n' "$1" "$1" "$2"; }
NGINX=${NGINX:-$(command -v nginx >/dev/null && echo 1 || echo 0)}
manifest=$(cluster eu-west "$EU"; cluster us-east "$US")
if [[ $NGINX == 1 ]]; then
  FIXED=127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$WORK/nginx"
  sed -e "s|@DIR@|$WORK/nginx|g" -e "s|@LISTEN@|$FIXED|g" "$HERE/nginx.conf.in" >"$WORK/nginx/nginx.conf"
  "${REST_CPU[@]}" nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
  PIDS+=($!)
  manifest+=$'\n'$(cluster fixed "$FIXED")
  "${GW_CPU[@]}" "$FLOTILLA" --server '' gateway --listen 127.0.0.1:0 --no-auth --scrape-interval-ms 0 \
    --backend "bench-fixed=http://$FIXED" >"$WORK/cgw.log" 2>&1 &
  PIDS+=($!)
  CGW=$(banner "$WORK/cgw.log" "listening on" | sed -E 's|.*http://([^ ]+).*|\1|')
fi
applied=0
for _ in $(seq 1 100); do
  if "$FLOTILLA" --server "$FED" apply -f - <<<"$manifest" >/dev/null 2>&1; then applied=1; break; fi
  sleep 0.1
done
(( applied )) || { log "the federation server took no Cluster"; cat "$WORK/fed.log" >&2; exit 1; }

"${GW_CPU[@]}" "$FLOTILLA" gateway --federation "$FED" --listen 127.0.0.1:0 --region eu-west \
  >"$WORK/gw.log" 2>&1 &
PIDS+=($!)
GW=$(banner "$WORK/gw.log" "listening on" | sed -E 's|.*http://([^ ]+).*|\1|')
want=$((2 + NGINX))
for _ in $(seq 1 200); do
  up=$(curl -s "http://$GW/metrics" | awk '/^flotilla_gateway_federation_member_up\{/ {s += $2} END {print s + 0}')
  [[ $up == "$want" ]] && break; sleep 0.05
done
[[ $up == "$want" ]] || { log "members never came up ($up of $want)"; cat "$WORK/gw.log" >&2; exit 1; }
log "federation $FED, members eu-west $EU (preferred) us-east $US, global gateway $GW"

to_ms() { # wrk's "412.00us" / "1.23ms" / "2.00s" -> milliseconds
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

run_wrk() { # TARGET ADDR CONNS ROUND [MODEL]
  local out p50 p99 rps
  out=$("${REST_CPU[@]}" env MODEL="${5:-bench}" wrk -t1 -c"$3" -d"${DURATION}s" --latency -s "$HERE/post.lua" "http://$2/v1/chat/completions")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out"); non2xx=${non2xx:-0}
  jq -cn --arg t "$1" --argjson c "$3" --argjson r "$4" --argjson p50 "$p50" --argjson p99 "$p99" \
    --argjson rps "$rps" --argjson bad "$non2xx" \
    '{measure: "latency", target: $t, conns: $c, round: $r, p50_ms: $p50, p99_ms: $p99, rps: $rps, non_2xx: $bad}' | tee -a "$OUT"
}

for c in $CONNS; do
  for r in $(seq 1 "$ROUNDS"); do
    run_wrk direct "$EU" "$c" "$r"
    run_wrk global "$GW" "$c" "$r"
    if [[ $NGINX == 1 ]]; then
      run_wrk fixed-direct "$FIXED" "$c" "$r" bench-fixed
      run_wrk fixed-global "$GW" "$c" "$r" bench-fixed
      run_wrk fixed-cluster-gateway "$CGW" "$c" "$r" bench-fixed
    fi
  done
done

log "failover: SIGKILL eu-west (pid $EU_PID) under load"
"${REST_CPU[@]}" env THREADS="${THREADS:-8}" DURATION=8 KILL_AT=3 python3 "$HERE/failover.py" "$GW" "$EU_PID" \
  | jq -c '{measure: "failover"} + .' | tee -a "$OUT"
curl -s "http://$GW/metrics" | grep -E '^flotilla_gateway_federation_(failovers_total|member_up)' | sed 's/^/  /' >&2

echo
echo "| conns | target | p50 ms (each round) | p99 ms (each round) | req/s (mean) |"
echo "| --- | --- | --- | --- | --- |"
jq -rs '[.[] | select(.measure == "latency")] | group_by([.conns, .target]) | .[] |
  "| \(.[0].conns) | \(.[0].target) | \(map(.p50_ms | tostring) | join(" / ")) | \(map(.p99_ms | tostring) | join(" / ")) | \(map(.rps) | add / length | floor) |"' "$OUT"
log "results in $OUT"
if [[ ${PROPAGATION:-1} == 1 ]]; then
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait "${PIDS[@]}" 2>/dev/null || true
  PIDS=()
  log "propagation: one FederatedModel change to ${MEMBERS:-10} member clusters"
  BENCH_OUT=$(dirname "$OUT") FLOTILLA_BIN=$FLOTILLA bash "$HERE/propagation.sh"
fi
