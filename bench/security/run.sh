#!/usr/bin/env bash
# TLS on vs off, same machine, same binary: store writes/s of a 3-server flotilla cluster at
# 1 and 64 clients (bench/loadgen's Apply load, as bench/store), alternating plain and TLS
# clusters ROUNDS times so drift hits both. Certificates come from `flotilla tls` (servers
# s1..s3 on 127.0.0.1, the load generator as admin `bench`). Prints a table and writes
# bench/security/results.json. Everything it starts is killed on exit.
#
# PIN=1 (the default) runs the three servers on CPU 0 and the load generator on CPU 1, as
# gateway.sh pins the gateway: the client's own TLS work then cannot take CPU from the servers
# (unpinned, a slower client shrank the servers' Raft batches and blurred the ratio).
#
# Knobs (environment): PIN (1), ROUNDS (3), DURATION (s, 10), WARMUP (s, 2), CLIENTS_HI (64),
# VALUE_SIZE (256), TARGET_DIR (cargo target dir, <repo>/target-bench), SKIP_BUILD=1,
# BENCH_DIR (parent of the temp dirs, /var/tmp).
set -euo pipefail
exec 2> >(grep --line-buffered -v '^[^ ]*: line [0-9]*: *[0-9]* Killed' >&2)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CLIENTS_HI=${CLIENTS_HI:-64}
VALUE_SIZE=${VALUE_SIZE:-256}
PIN=${PIN:-1}
pin_cpus

build
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building the load generator (release) into $TARGET"
  cargo build --release -q --manifest-path "$ROOT/bench/loadgen/Cargo.toml" --target-dir "$TARGET"
fi
LOADGEN=$TARGET/release/loadgen
require jq
warn_busy
workdir secbench KILL

# certificates, once
(cd "$WORK" && "$FLOTILLA" tls ca create --dir tls >/dev/null &&
  for i in 1 2 3; do "$FLOTILLA" tls cert create --ca-dir tls --dir tls --role server --name "s$i" --ip 127.0.0.1 >/dev/null; done &&
  "$FLOTILLA" tls cert create --ca-dir tls --dir tls --role admin --name bench >/dev/null)

cpu_ticks() { # pids -> their user+system CPU time in clock ticks, summed
  local t=0 p f
  for p in "$@"; do
    read -r -a f < <(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
    t=$((t + f[11] + f[12]))
  done
  echo "$t"
}

run_cluster() { # mode round -> prints JSON lines of the load runs
  local mode=$1 round=$2 dir="$WORK/$1-$2" i eps="" leader
  mkdir -p "$dir"
  read -r -a P <<<"$("$LOADGEN" ports --n 6)"
  for i in 1 2 3; do
    local tls=()
    [[ $mode == tls ]] && tls=(--tls-cert "$WORK/tls/server-s$i.pem" --tls-key "$WORK/tls/server-s$i-key.pem" --tls-ca "$WORK/tls/ca.pem")
    local join=(--bootstrap)
    [[ $i != 1 ]] && join=(--join "127.0.0.1:${P[0]}")
    "${PIN0[@]}" "$FLOTILLA" server --id "$i" --data-dir "$dir/s$i" --grpc-addr "127.0.0.1:${P[$((i-1))]}" \
      --http-addr "127.0.0.1:${P[$((i+2))]}" "${join[@]}" "${tls[@]}" >"$dir/s$i.log" 2>&1 &
    PIDS+=($!)
    eps+="${eps:+,}127.0.0.1:${P[$((i-1))]}"
    sleep 0.3
  done
  if [[ $mode == tls ]]; then
    export FLOTILLA_TLS_CERT=$WORK/tls/admin-bench.pem FLOTILLA_TLS_KEY=$WORK/tls/admin-bench-key.pem FLOTILLA_TLS_CA=$WORK/tls/ca.pem
  else
    unset FLOTILLA_TLS_CERT FLOTILLA_TLS_KEY FLOTILLA_TLS_CA
  fi
  leader=$("$LOADGEN" wait-ready --system flotilla --endpoints "$eps" --timeout-s 60 | jq -r .leader)
  # the load writes Adapters of base model `bench`
  printf 'kind: Model\nmetadata: {name: bench}\nspec: {engine: sim, source: "file:///models/bench", replicas: 0, gpus: 1}\n' >"$dir/bench.yaml"
  "$FLOTILLA" --server "$eps" apply -f "$dir/bench.yaml" >/dev/null
  for c in 1 "$CLIENTS_HI"; do
    # the servers' CPU time over the run (warm-up included) next to its writes: a per-write
    # cost that a noisy neighbour moves much less than it moves writes/s
    local cpu0 cpu1
    cpu0=$(cpu_ticks "${PIDS[@]}")
    "${PIN1[@]}" "$LOADGEN" load --system flotilla --endpoint "$leader" --clients "$c" --duration-s "$DURATION" \
      --warmup-s "$WARMUP" --value-size "$VALUE_SIZE" --label "$mode-c$c-r$round" >"$dir/load.json"
    cpu1=$(cpu_ticks "${PIDS[@]}")
    jq -c --argjson ticks "$((cpu1 - cpu0))" --argjson hz "$(getconf CLK_TCK)" --argjson warm "$WARMUP" \
      '. + {server_cpu_s: ($ticks / $hz), server_cpu_us_per_write: ($ticks / $hz * 1e6 / (.writes_per_s * (.duration_s + $warm)))}' \
      "$dir/load.json"
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait "${PIDS[@]}" 2>/dev/null || true  # not a bare wait: it would wait for the stderr filter too
  PIDS=()
}

RUNS=()
for r in $(seq 1 "$ROUNDS"); do
  for mode in plain tls; do
    log "round $r: $mode"
    while read -r line; do
      RUNS+=("$line")
      log "  $(jq -c '{label: .label, writes_per_s, p50_ms, p99_ms, errors, server_cpu_us_per_write}' <<<"$line")"
    done < <(run_cluster "$mode" "$r")
  done
done
printf '%s\n' "${RUNS[@]}" | jq -s '.' >"$HERE/results.json"
printf '%s\n' "${RUNS[@]}" | jq -rs '
  group_by(.label | sub("-r[0-9]+$"; "")) | map({k: (.[0].label | sub("-r[0-9]+$"; "")),
    w: ([.[].writes_per_s] | sort | .[length/2|floor]), p99: ([.[].p99_ms] | sort | .[length/2|floor]),
    cpu: ([.[].server_cpu_us_per_write] | sort | .[length/2|floor])})
  | .[] | "\(.k)\tmedian writes/s \(.w|floor)\tmedian p99 \(.p99) ms\tmedian server CPU \(.cpu|floor) µs/write"'
