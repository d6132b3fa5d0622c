#!/usr/bin/env bash
# Runs the flotilla sim benchmarks and prints JSON lines (see bench.py for what each does).
# Uses $FLOTILLA_BIN (`flotilla sim`) if set, else builds and uses the sim crate's flotilla-sim binary.
# usage: bench/sim/run.sh [cpu|cpu-stream|fidelity|all]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${FLOTILLA_BIN:-}" ] && [ -z "${SIM_BIN:-}" ]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target-sim}"
    (cd "$REPO" && cargo build --release -q -p flotilla-sim --bin flotilla-sim)
    export SIM_BIN="$CARGO_TARGET_DIR/release/flotilla-sim"
fi
what="${1:-all}"
B="$REPO/bench/sim/bench.py"
case "$what" in
    cpu) python3 "$B" cpu --sims 8 --streams 64 --seconds 30 ;;
    cpu-stream) python3 "$B" cpu --sims 8 --streams 64 --seconds 30 --stream ;;
    fidelity) python3 "$B" fidelity --speedup 20 ;;
    all)
        python3 "$B" cpu --sims 8 --streams 64 --seconds 30
        python3 "$B" cpu --sims 8 --streams 64 --seconds 30 --stream
        python3 "$B" fidelity --speedup 20 ;;
    *) echo "usage: $0 [cpu|cpu-stream|fidelity|all]" >&2; exit 2 ;;
esac
