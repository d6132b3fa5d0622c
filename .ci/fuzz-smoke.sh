#!/usr/bin/env bash
# Fuzz smoke: builds the cargo-fuzz targets of fuzz/ and runs each for FUZZ_SECONDS
# (default 15) from its seed corpus fuzz/corpus/<target>/, exiting non-zero on a crash, a
# failed property (a panic), a hang (FUZZ_TIMEOUT s per input, default 5) or a build error.
# A failing input is kept in fuzz/artifacts/<target>/; replay it with
#   (cd fuzz && cargo fuzz run --sanitizer none <target> artifacts/<target>/<file>)
#
# Stable Rust: libFuzzer with SanitizerCoverage works on stable, the sanitizers do not
# (-Zsanitizer is nightly-only), hence --sanitizer none; the targets are safe Rust, and
# overflow checks and debug assertions stay on (cargo fuzz's default).
#
# Installs cargo-fuzz (pinned) into CARGO_FUZZ_ROOT (default ~/.cache/flotilla/cargo-fuzz)
# when it is not on PATH: about a minute on 2 cores. The first build of the targets takes
# about 5 minutes on 2 cores (everything is compiled with coverage instrumentation, into
# FUZZ_TARGET_DIR, default fuzz/target); later builds take seconds. New corpus entries go to
# a temporary directory, so the seeds in the repository stay as they are.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export CARGO_TERM_COLOR=never

secs="${FUZZ_SECONDS:-15}"
per_input="${FUZZ_TIMEOUT:-5}"
target_dir="${FUZZ_TARGET_DIR:-$PWD/target}"
fuzz_root="${CARGO_FUZZ_ROOT:-$HOME/.cache/flotilla/cargo-fuzz}"
cargo_fuzz_version=0.13.2

export PATH="$fuzz_root/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz $cargo_fuzz_version into $fuzz_root"
  start=$(date +%s)
  CARGO_INSTALL_ROOT="$fuzz_root" cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --quiet
  echo "fuzz-smoke: installed in $(($(date +%s) - start)) s"
fi
echo "fuzz-smoke: $(cargo fuzz --version), $(rustc --version)"

start=$(date +%s)
cargo fuzz build --sanitizer none --target-dir "$target_dir"
echo "fuzz-smoke: built the targets in $(($(date +%s) - start)) s"

runs_start=$(date +%s)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for t in $(cargo fuzz list); do
  seeds="corpus/$t"
  mkdir -p "$work/$t"
  echo "fuzz-smoke: $t for ${secs} s from $(find "$seeds" -type f 2>/dev/null | wc -l) seeds in fuzz/$seeds"
  log="$work/$t.log"
  if cargo fuzz run --sanitizer none --target-dir "$target_dir" "$t" "$work/$t" "$seeds" -- \
    -max_total_time="$secs" -timeout="$per_input" -print_final_stats=1 >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
    echo "fuzz-smoke: $t ok: ${runs:-?} inputs, ${cov:-cov: ?} edges, corpus $(find "$work/$t" -type f | wc -l) new"
  else
    echo "fuzz-smoke: $t FAILED:"
    # The panic, libFuzzer's verdict and where it kept the input; else the end of the log.
    grep -E -A3 'panicked at' "$log" | head -n 20 || true
    grep -E 'ERROR: libFuzzer|SUMMARY|Test unit written|^Base64' "$log" || tail -n 40 "$log"
    failed+=("$t")
  fi
done

echo "fuzz-smoke: ran the targets in $(($(date +%s) - runs_start)) s, $(($(date +%s) - start)) s with the build"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz-smoke: failing targets: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
