# Process helpers shared by the bench scripts (sourced: bench/routing/run.sh, bench/pd/run.sh).
# Sets WORK (a temp dir) and PIDS (the processes a run started); both go on exit.

WORK=$(mktemp -d)
PIDS=()
# stop_all: kill and reap every process the run started.
stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
cleanup() { stop_all; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_banner FILE REGEX: print the first capture of REGEX in FILE once it appears (30 s).
wait_banner() {
  for _ in $(seq 1 300); do
    local m; m=$(sed -nE "s#$2#\\1#p" "$1" | head -1)
    [[ -n "$m" ]] && { echo "$m"; return 0; }
    sleep 0.1
  done
  return 1
}

# wait_ready URL MODEL TIMEOUT_S: a one-token completion of MODEL through URL answers 200,
# each try within TIMEOUT_S (300 tries, 0.2 s apart).
wait_ready() {
  for _ in $(seq 1 300); do
    curl -sf -m "$3" -o /dev/null -H 'content-type: application/json' \
      -d "{\"model\":\"$2\",\"prompt\":\"ready?\",\"max_tokens\":1}" "$1/v1/completions" && return 0
    sleep 0.2
  done
  return 1
}
