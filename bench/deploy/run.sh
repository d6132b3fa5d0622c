#!/usr/bin/env bash
# docs/deploy.md timed on real addresses: the namespace test cli/tests/multihost_netns.rs
# (three hosts with server + agent from deploy/systemd and deploy/config, TLS on, a gateway
# host, two client loops in a client namespace) run RUNS times with the release binary. Each
# run prints two lines: the wall time from empty hosts (namespaces made, nothing running) to
# the first request served through the gateway, with its steps; and the requests sent and
# failed while the leader's host was cut off (`ip link set down`, 8 s), the slow ones, the
# CLI write during the cut and the time for the cut host to rejoin after the restore.
#
# Usage: sudo bench/deploy/run.sh [RUNS]     (root, iproute2, curl; default 5 runs)
# Results: bench/deploy/RESULTS.md. Full output of every run: $OUT (default /tmp/flotilla-deploy-bench.log).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-5}
out=${OUT:-/tmp/flotilla-deploy-bench.log}
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -p flotilla
# The test harness itself is tiny: a debug build of it drives the release binary.
cargo test -p flotilla --test multihost_netns --no-run
echo "commit $(git rev-parse --short HEAD), $(nproc) cores, $(uname -m), $(date -u +%Y-%m-%dT%H:%MZ)"
: >"$out"
for i in $(seq 1 "$runs"); do
  FLOTILLA_BIN=$target/release/flotilla FLOTILLA_REQUIRE_NETNS=1 \
    cargo test -q -p flotilla --test multihost_netns -- --nocapture >>"$out" 2>&1 \
    || { echo "run $i failed; see $out" >&2; exit 1; }
  grep '^multihost [dc]' "$out" | tail -2 | sed "s/^/run $i: /"
done
