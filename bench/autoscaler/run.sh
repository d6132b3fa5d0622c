#!/usr/bin/env bash
# Autoscaler benchmark: build, calibrate one replica's capacity under the SLO, then replay
# the seeded trace under each policy (one fresh stack per policy, torn down after).
# Usage: bench/autoscaler/run.sh [policies...]   (default: static kpa apa slo hpa)
# Env: K (speedup, 10), DURATION (simulated seconds, 1800), SEED (20261126), OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-asb}
K=${K:-10}; DURATION=${DURATION:-1800}; SEED=${SEED:-20261126}
OUT=${OUT:-bench/autoscaler/out}
BIN=$CARGO_TARGET_DIR/release/flotilla
[ -x "$BIN" ] || cargo build --release -p flotilla
mkdir -p "$OUT"
POLICIES=("$@"); [ ${#POLICIES[@]} -gt 0 ] || POLICIES=(static kpa apa slo hpa)
PY=python3
[ -f "$OUT/calibration.json" ] || timeout 600 $PY bench/autoscaler/bench.py calibrate --bin "$BIN" --k "$K" --seed "$SEED" --out "$OUT"
$PY bench/autoscaler/bench.py trace --duration "$DURATION" --seed "$SEED" > "$OUT/trace.json"
for p in "${POLICIES[@]}"; do
  timeout $(( ${DURATION%.*} / ${K%.*} + 300 )) $PY bench/autoscaler/bench.py run --policy "$p" --bin "$BIN" \
    --k "$K" --duration "$DURATION" --seed "$SEED" --out "$OUT" --calibration "$OUT/calibration.json"
done
