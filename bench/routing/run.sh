#!/usr/bin/env bash
# KV-aware routing benchmark (issue 23): 8 `flotilla sim` engines publishing KV events, one
# router process per point (flotilla gateway, vllm-router, sglang-router), the same seeded
# shared-prefix workload for every target (bench/routing/driver), fresh engines and router
# for every point (target x load x run). Appends one JSON line per point to $OUT; turn it
# into a table with bench/routing/report.py.
#
# Needs:
#   CARGO_TARGET_DIR=... cargo build --release --bin flotilla           (FLOTILLA_BIN=.../flotilla)
#   (cd bench/routing/driver && cargo build --release)                  (DRIVER_BIN=...)
#   python3 -m venv /tmp/benchvenv/venv && /tmp/benchvenv/venv/bin/pip install vllm-router sglang-router   (BENCH_VENV=...)
# Usage:
#   bash bench/routing/run.sh                       # full sweep: every target x RATES x RUNS
#   QUICK=1 TARGETS=flotilla:prefix-cache bash bench/routing/run.sh   # harness check
# Targets: flotilla:STRATEGY, vllm-router:POLICY, sglang-router:POLICY. A flotilla target's
# gateway gets $FLOTILLA_ARGS_<strategy> (dashes as underscores) and its requests the header
# $FLOTILLA_HEADER_<strategy>; defaults: kv-aware gets `--routing m=kv-aware --tokenizer m=sim`
# and no header, every other strategy the header `x-flotilla-routing:STRATEGY`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

TARGETS=${TARGETS:-flotilla:kv-aware,flotilla:prefix-cache,vllm-router:cache_aware,sglang-router:cache_aware}
ENGINES=${ENGINES:-8}
KV_BLOCKS=${KV_BLOCKS:-2560}          # per engine, 16 tokens each (= the L4 profile's own): 10.2 of the 60 prefixes
PROFILE=${PROFILE:-l4-llama3-8b}
SPEEDUP=${SPEEDUP:-2}              # twice real time: the sims, not the 2 cores, saturate
PREFIXES=${PREFIXES:-60}
PREFIX_TOKENS=${PREFIX_TOKENS:-4000}
SUFFIX_TOKENS=${SUFFIX_TOKENS:-32}
ZIPF=${ZIPF:-1.0}
MAX_TOKENS=${MAX_TOKENS:-32}
RATES=${RATES:-15 26 36}              # req/s: 40%, 70%, 95% of the saturation rate, 38 req/s (RESULTS.md)
RUNS=${RUNS:-3}
SEED_BASE=${SEED_BASE:-0}            # run r uses seed SEED_BASE + r: tune on one base, judge on another
REQUESTS=${REQUESTS:-2000}
MAX_DURATION_S=${MAX_DURATION_S:-300} # no request is sent later than this in a point
REQUEST_TIMEOUT_S=${REQUEST_TIMEOUT_S:-120}
if [[ -n "${QUICK:-}" ]]; then
  REQUESTS=${QUICK_REQUESTS:-300}; RUNS=1; RATES=${QUICK_RATE:-36}; MAX_DURATION_S=60
fi
VENV=${BENCH_VENV:-/tmp/benchvenv/venv}
FLOTILLA_BIN=${FLOTILLA_BIN:-$ROOT/target/release/flotilla}
DRIVER_BIN=${DRIVER_BIN:-$HERE/driver/target/release/routing-driver}
mkdir -p "$HERE/out"
OUT=${OUT:-$HERE/out/run-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
KV_EVENTS='{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:0","replay_endpoint":"tcp://*:0","topic":"kv"}'
: "${FLOTILLA_ARGS_kv_aware=--routing m=kv-aware --tokenizer m=sim}"
: "${FLOTILLA_HEADER_kv_aware=}"

for b in "$FLOTILLA_BIN" "$DRIVER_BIN"; do [[ -x "$b" ]] || { echo "missing $b (see the header of $0)" >&2; exit 2; }; done

# shellcheck source=../procs.sh
source "$HERE/../procs.sh"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_sims() {
  SIMS=()
  for i in $(seq 1 "$ENGINES"); do
    "$FLOTILLA_BIN" sim --port 0 --model m --profile "$PROFILE" --speedup "$SPEEDUP" \
      --num-gpu-blocks "$KV_BLOCKS" --kv-events-config "$KV_EVENTS" > "$WORK/sim$i.log" 2>&1 & PIDS+=($!)
  done
  for i in $(seq 1 "$ENGINES"); do
    SIMS+=("$(wait_banner "$WORK/sim$i.log" '.*listening on (http://[0-9.:]+).*')") || { echo "sim $i did not start:" >&2; cat "$WORK/sim$i.log" >&2; return 1; }
  done
}

# start_router TARGET: sets ROUTER_URL and HEADERS (driver --header args).
start_router() {
  local kind=${1%%:*} strategy=${1#*:} log="$WORK/router.log"
  HEADERS=()
  case "$kind" in
    flotilla)
      local var=${strategy//-/_} args header
      eval "args=\${FLOTILLA_ARGS_$var-}"
      eval "header=\${FLOTILLA_HEADER_$var-x-flotilla-routing:$strategy}"
      [[ -n "$header" ]] && HEADERS=(--header "$header")
      local backends=(); for s in "${SIMS[@]}"; do backends+=(--backend "m=$s"); done
      # --server "": static backends only (the default 127.0.0.1:7070 would be watched, and a
      # flotilla dev there would add its models). shellcheck disable=SC2086: $args is a list of flags
      "$FLOTILLA_BIN" --server "" gateway --no-auth --listen 127.0.0.1:0 "${backends[@]}" $args > "$log" 2>&1 & PIDS+=($!)
      ROUTER_URL=$(wait_banner "$log" '^flotilla gateway listening on (http://[0-9.:]+).*') || return 1 ;;
    vllm-router|sglang-router)
      local port; port=$(free_port)
      local launch=(); [[ "$kind" == sglang-router ]] && launch=(launch)
      local level=warning; [[ "$kind" == sglang-router ]] && level=warn
      "$VENV/bin/$kind" "${launch[@]}" --host 127.0.0.1 --port "$port" --policy "$strategy" \
        --prometheus-port "$(free_port)" --log-level "$level" --worker-urls "${SIMS[@]}" > "$log" 2>&1 & PIDS+=($!)
      ROUTER_URL="http://127.0.0.1:$port" ;;
    *) echo "unknown target kind $kind" >&2; return 2 ;;
  esac
  wait_ready "$ROUTER_URL" m 2
}

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
VERSIONS=$("$VENV/bin/pip" list 2>/dev/null | awk '$1=="vllm-router"||$1=="sglang-router" {v = v (v ? ", " : "") $1 " " $2} END {print v}')
echo "# $(date -u +%FT%TZ) commit $COMMIT, $(nproc) cores, peers: ${VERSIONS:-none}; out: $OUT" >&2
for run in $(seq 1 "$RUNS"); do
  for rate in $RATES; do
    for target in ${TARGETS//,/ }; do
      extra=$(printf '{"target":"%s","run":%d,"commit":"%s","kv_blocks":%d,"profile":"%s","speedup":%s,"peers":"%s"}' \
        "$target" "$run" "$COMMIT" "$KV_BLOCKS" "$PROFILE" "$SPEEDUP" "$VERSIONS")
      if ! start_sims || ! start_router "$target"; then
        echo "$target: did not start; router log:" >&2; tail -5 "$WORK/router.log" >&2 || true
        printf '{"label":"%s","rate":%s,"error":"did not start"}\n' "$target" "$rate" | python3 -c \
          "import json,sys; d=json.loads(sys.stdin.read()); d.update(json.loads(sys.argv[1])); print(json.dumps(d))" "$extra" >> "$OUT"
        stop_all; continue
      fi
      sims_csv=$(IFS=,; echo "${SIMS[*]}")
      "$DRIVER_BIN" --url "$ROUTER_URL" --sims "$sims_csv" --model m "${HEADERS[@]}" --label "$target" \
        --requests "$REQUESTS" --rate "$rate" --seed "$((SEED_BASE + run))" --prefixes "$PREFIXES" \
        --prefix-tokens "$PREFIX_TOKENS" --suffix-tokens "$SUFFIX_TOKENS" --zipf "$ZIPF" \
        --max-tokens "$MAX_TOKENS" --max-duration-s "$MAX_DURATION_S" \
        --request-timeout-s "$REQUEST_TIMEOUT_S" --extra "$extra" > "$WORK/point.json" & PIDS+=($!)
      # In the background and waited for, so a TERM or INT reaches the trap at once.
      if wait "${PIDS[-1]}"; then tee -a "$OUT" < "$WORK/point.json"; else echo "$target: driver failed" >&2; fi
      cp "$WORK/router.log" "$HERE/out/last-router-${target//[:\/]/_}.log" 2>/dev/null || true
      stop_all
    done
  done
done
echo "# done: python3 $HERE/report.py $OUT" >&2
