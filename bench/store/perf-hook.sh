#!/usr/bin/env bash
# A PHASE_HOOK for run.sh: profiles the leader during one phase with `perf record -g`.
#   PHASE_HOOK=bench/store/perf-hook.sh PERF_PHASE=flotilla/model/64 PERF_OUT=/var/tmp/x.data \
#     bench/store/run.sh
# PERF_PHASE (SYSTEM/KIND/CLIENTS, default flotilla/model/64) picks the phase; recording
# starts PERF_DELAY_S (2, the warm-up) after the phase starts and lasts PERF_SECONDS (10).
# Read it with `perf report -i $PERF_OUT --no-children --percent-limit 2`.
set -euo pipefail
what=$1 sys=$2 kind=$3 clients=$4 pid=${5:-}
[[ "$sys/$kind/$clients" == "${PERF_PHASE:-flotilla/model/64}" && -n $pid ]] || exit 0
out=${PERF_OUT:-/var/tmp/flotilla-bench-perf.data}
case $what in
  start)
    (sleep "${PERF_DELAY_S:-2}"; exec perf record -q -g -p "$pid" -o "$out" -- sleep "${PERF_SECONDS:-10}") \
      >"$out.log" 2>&1 &
    echo $! >"$out.pid"
    ;;
  stop)
    p=$(cat "$out.pid" 2>/dev/null || true)
    # perf ends by itself after PERF_SECONDS; wait for it (bounded) so the file is whole.
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    rm -f "$out.pid"
    ;;
esac
