#!/usr/bin/env bash
# Rolling-upgrade benchmark (issue 20): every component of a 3-server, 2-agent, 2-gateway
# cluster restarted one at a time in the documented order (servers followers first and the
# leader last, then agents, then gateways) under streaming load through both gateways; the
# duration of each step and of the whole upgrade, and the failed requests (goal 0).
# It runs the test cli/tests/rolling_upgrade.rs RUNS times with the processes started from
# the release binary (FLOTILLA_TEST_BIN); the test harness itself is a debug build.
# Usage: bench/upgrade/run.sh
# Knobs (environment): RUNS (5), DOWNTIME_MS (1000: each component's time down between stop
# and start), TARGET_DIR (<repo>/target-bench), SKIP_BUILD=1, OUT (bench/upgrade/last-run.log).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${TARGET_DIR:-$ROOT/target-bench}
RUNS=${RUNS:-5}
OUT=${OUT:-$HERE/last-run.log}
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  (cd "$ROOT" && cargo build --release -q -p flotilla --target-dir "$TARGET")
fi
BIN=$TARGET/release/flotilla
[[ -x $BIN ]] || { echo "no release binary at $BIN" >&2; exit 1; }
: > "$OUT"
echo "binary $BIN, commit $(git -C "$ROOT" rev-parse --short HEAD), $(date -u +%FT%TZ), downtime ${DOWNTIME_MS:-1000} ms" | tee -a "$OUT"
for i in $(seq 1 "$RUNS"); do
  echo "--- run $i" | tee -a "$OUT"
  (cd "$ROOT" && FLOTILLA_TEST_BIN=$BIN FLOTILLA_UPGRADE_DOWNTIME_MS=${DOWNTIME_MS:-1000} \
    cargo test -q -p flotilla --test rolling_upgrade -- --nocapture 2>&1) \
    | grep -E '^(server|agent|gateway|upgrade|step) |^test result|panicked' | tee -a "$OUT"
done
echo "--- summary" | tee -a "$OUT"
grep '^upgrade of' "$OUT" | awk '{
  d=$7; n++; sum+=d; if (d>max) max=d; ok+=$9; failed+=$12
} END { if (n) printf "%d runs: upgrade %.2f s mean, %.2f s max; %d streams completed, %d failed\n", n, sum/n, max, ok, failed }' | tee -a "$OUT"
