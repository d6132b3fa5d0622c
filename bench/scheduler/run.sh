#!/usr/bin/env bash
# Scheduler benchmark: 1,000 in-process nodes x 8 GPUs, 500 models / 6,000 replicas, then
# 50 failed nodes. Usage: bench/scheduler/run.sh [NODES MODELS]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-bench}"
cargo build --release -q -p flotilla-actors --example scheduler_bench
"$CARGO_TARGET_DIR/release/examples/scheduler_bench" "$@"
