#!/usr/bin/env bash
# Federation propagation: one FederatedModel change, time until every one of N member
# clusters holds it. N member clusters (one `flotilla server --bootstrap` each: the
# federation writes Model objects, so no agents are needed) and one federation server, all
# on loopback; `loadgen propagation` applies TRIALS changes to the FederatedModel's
# template and polls every member (a local read each 5 ms) until its Model carries it.
#
# Knobs: MEMBERS (10), TRIALS (20), FLOTILLA_BIN (release binary; default target-bench),
# TARGET_DIR (<repo>/target-bench), BENCH_OUT (where results.json goes; default here).
set -euo pipefail
# bash reports each server this script kill -9s at exit: expected, so hidden.
exec 2> >(grep --line-buffered -v '^[^ ]*: line [0-9]*: *[0-9]* Killed' >&2)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${TARGET_DIR:-$ROOT/target-bench}
MEMBERS=${MEMBERS:-10}
TRIALS=${TRIALS:-20}
OUT=${BENCH_OUT:-$HERE}
BIN=${FLOTILLA_BIN:-$TARGET/release/flotilla}
LOADGEN=$TARGET/release/loadgen
log() { printf '[propagation %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[[ -x $BIN ]] || { log "no flotilla binary at $BIN (cargo build --release -p flotilla --target-dir $TARGET)"; exit 1; }
if [[ ! -x $LOADGEN ]]; then
  log "building the load generator"
  (cd "$ROOT/bench/loadgen" && cargo build --release -q --target-dir "$TARGET")
fi
WORK=$(mktemp -d /var/tmp/fedprop.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$OUT"
# Every listener's port is picked up front (gRPC and HTTP): a server given port 0 for one
# could otherwise take a port picked for another server that has not started yet.
read -r -a PORTS <<<"$("$LOADGEN" ports --n $((2 * (MEMBERS + 1))))"

start() { # ID-DIR INDEX EXTRA... ; the server on PORTS[INDEX] (gRPC) and PORTS[MEMBERS+1+INDEX] (HTTP)
  local dir=$WORK/$1 port=${PORTS[$2]} http=${PORTS[$((MEMBERS + 1 + $2))]}; shift 2
  "$BIN" server --id 1 --data-dir "$dir" --bootstrap --grpc-addr "127.0.0.1:$port" --http-addr "127.0.0.1:$http" "$@" \
    >"$dir.log" 2>&1 &
  PIDS+=($!)
}
MEMBER_ADDRS=()
for i in $(seq 1 "$MEMBERS"); do
  start "m$i" "$i"
  MEMBER_ADDRS+=("127.0.0.1:${PORTS[$i]}")
done
FED=127.0.0.1:${PORTS[0]}
start fed 0 --federation
"$LOADGEN" wait-ready --system flotilla --endpoints "$FED" >/dev/null
for a in "${MEMBER_ADDRS[@]}"; do "$LOADGEN" wait-ready --system flotilla --endpoints "$a" >/dev/null; done
log "$MEMBERS member clusters and a federation server up (load $(cut -d' ' -f1-3 /proc/loadavg))"
for i in $(seq 1 "$MEMBERS"); do
  printf 'kind: Cluster\nmetadata: {name: m%s}\nspec: {servers: ["%s"]}\n---\n' "$i" "${MEMBER_ADDRS[$((i - 1))]}"
done >"$WORK/clusters.yaml"
"$BIN" --server "$FED" apply -f "$WORK/clusters.yaml" >/dev/null
members=$(IFS=,; echo "${MEMBER_ADDRS[*]}")
result=$("$LOADGEN" propagation --federation "$FED" --members "$members" --trials "$TRIALS")
jq '{members, all_members_p50_ms, all_members_max_ms, first_ms_p50: ([.trials[].first_ms] | sort | .[length/2|floor])}' <<<"$result" >&2
jq --arg commit "$(git -C "$ROOT" rev-parse --short HEAD)" --arg date "$(date -u +%FT%TZ)" \
  '. + {commit: $commit, date: $date, machine: "'"$(nproc)"'-core VM"}' <<<"$result" >"$OUT/propagation.json"
log "results: $OUT/propagation.json"
