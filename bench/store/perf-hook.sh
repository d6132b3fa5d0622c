#!/usr/bin/env bash
# A PHASE_HOOK for run.sh: profiles the leader during some phases with `perf record`.
#   PHASE_HOOK=bench/store/perf-hook.sh PERF_PHASE="flotilla/model/64 flotilla/tenant/64" \
#     PERF_OUT=/var/tmp/x bench/store/run.sh     # -> /var/tmp/x-flotilla-model-64.data, ...
# PERF_PHASE (SYSTEM/KIND/CLIENTS, space-separated, default flotilla/model/64) picks the
# phases; recording starts PERF_DELAY_S (2, the warm-up) after the phase starts and lasts
# PERF_SECONDS (10).
# PERF_CALLGRAPH: `fp` (default, `-g`: cheap, but the release build has no frame pointers, so
# only the leaf function is reliable) or `dwarf` (`--call-graph dwarf`: callers too, large
# files). Read it with `perf report -i FILE --no-children --percent-limit 2`.
set -euo pipefail
what=$1 sys=$2 kind=$3 clients=$4 pid=${5:-}
[[ " ${PERF_PHASE:-flotilla/model/64} " == *" $sys/$kind/$clients "* && -n $pid ]] || exit 0
out=${PERF_OUT:-/var/tmp/flotilla-bench-perf}-$sys-$kind-$clients.data
cg=-g; [[ ${PERF_CALLGRAPH:-fp} == dwarf ]] && cg="-F 499 --call-graph dwarf,16384"
case $what in
  start)
    (sleep "${PERF_DELAY_S:-2}"; exec perf record -q $cg -p "$pid" -o "$out" -- sleep "${PERF_SECONDS:-10}") \
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
