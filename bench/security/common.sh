# Sourced by the security benchmarks (run.sh, gateway.sh, engine-tls.sh): what each of them
# did the same way before its own work. Sets ROOT, TARGET and FLOTILLA; defines `log`;
# `require` checks tools; `build` makes the release binary unless SKIP_BUILD=1; `warn_busy`
# names processes that would skew the numbers; `pin_cpus` fills PIN0 and PIN1 (`taskset -c 0`
# and `-c 1`, or nothing) from PIN; `workdir NAME [SIGNAL]` makes WORK under BENCH_DIR
# (/var/tmp) and a PIDS list whose processes get SIGNAL (TERM) and WORK removed on exit.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET=${TARGET_DIR:-$ROOT/target-bench}
FLOTILLA=$TARGET/release/flotilla
log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

require() {
  local tool
  for tool in "$@"; do command -v "$tool" >/dev/null || { log "$tool is required"; exit 1; }; done
}

build() {
  [[ ${SKIP_BUILD:-0} == 1 ]] && return 0
  log "building flotilla (release) into $TARGET"
  (cd "$ROOT" && cargo build --release -q -p flotilla --target-dir "$TARGET")
}

warn_busy() {
  local busy
  busy=$(ps -eo pcpu=,comm= | awk '$1 > 20 {print $2}' | paste -sd, -)
  [[ -z $busy ]] || log "WARNING: busy processes while benchmarking: $busy"
}

pin_cpus() {
  PIN0=() PIN1=()
  if [[ $PIN == 1 ]]; then
    (( $(nproc) >= 2 )) || { log "PIN=1 needs two cores"; exit 1; }
    PIN0=(taskset -c 0) PIN1=(taskset -c 1)
  fi
}

workdir() {
  WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/flotilla-$1.XXXXXX")
  KILL_SIGNAL=${2:-TERM}
  PIDS=()
  trap cleanup EXIT INT TERM
}

cleanup() {
  for p in "${PIDS[@]}"; do kill -s "$KILL_SIGNAL" "$p" 2>/dev/null || true; done
  wait "${PIDS[@]}" 2>/dev/null || true  # not a bare wait: it would wait for run.sh's stderr filter too
  rm -rf "$WORK"
}
