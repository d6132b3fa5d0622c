#!/usr/bin/env bash
# Replica lifecycle benchmark (issue 19): heal time after a node loss (TRIALS trials) and a
# rolling update of REPLICAS sim replicas over NODES agents with START_S-second engine
# starts, under streaming load through a gateway. The shipped binary, release build.
# Usage: bench/lifecycle/run.sh [heal] [rolling]
# Knobs (environment): TRIALS (10), NODES (50), GPUS per node (3), REPLICAS (100),
# START_S (60), CLIENTS (8), TARGET_DIR (<repo>/target-bench), SKIP_BUILD=1, BENCH_DIR.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${TARGET_DIR:-$ROOT/target-bench}
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  (cd "$ROOT" && cargo build --release -q -p flotilla --target-dir "$TARGET")
fi
ulimit -n 65536 2>/dev/null || true
FLOTILLA=$TARGET/release/flotilla exec python3 "$HERE/lifecycle.py" "$@"
