#!/usr/bin/env bash
# Dense LoRA serving vs one dedicated replica per adapter (see bench.py and RESULTS.md).
# Uses $FLOTILLA_BIN if set, else builds the release `flotilla` binary into
# $CARGO_TARGET_DIR (default target-bench). Appends JSON lines to $OUT (default
# bench/lora/results.jsonl) and prints them. About 13 minutes on a 2-core VM.
# usage: bench/lora/run.sh [calib|low|mid|high|dedicated|all]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${FLOTILLA_BIN:-}" ]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target-bench}"
    (cd "$REPO" && cargo build --release -q -p flotilla)
    export FLOTILLA_BIN="$CARGO_TARGET_DIR/release/flotilla"
fi
B="$REPO/bench/lora/bench.py"
OUT="${OUT:-$REPO/bench/lora/results.jsonl}"
LOGS="${LOGS:-$(mktemp -d /tmp/flotilla-lora-logs.XXXX)}"
SLO="${SLO:-1.0}"          # TTFT p99, seconds
LOW="${LOW:-2}"            # total req/s
MID="${MID:-20}"           # total req/s
MID_START="${MID_START:-5}"
HIGH="${HIGH:-40}"         # total req/s
HIGH_START="${HIGH_START:-8}"
C=(--slo "$SLO" --out "$OUT" --log-dir "$LOGS")

calib() {   # one replica, no LoRA, rising rate: its SLO capacity
    python3 "$B" calib --rates 20,24,28 --warmup 10 --duration 30 "${C[@]}"
}
low() {     # >= 500 measured requests at 2 req/s: 270 s measured after 30 s of warm-up
    python3 "$B" search --rate "$LOW" --start 1 --warmup 30 --duration 270 "${C[@]}"
}
mid() {     # 600 measured requests at 20 req/s
    python3 "$B" search --rate "$MID" --start "$MID_START" --warmup 20 --duration 30 "${C[@]}"
}
high() {    # 800 measured requests at 40 req/s
    python3 "$B" search --rate "$HIGH" --start "$HIGH_START" --warmup 20 --duration 20 "${C[@]}"
}
dedicated() {  # GPUs for one replica per active adapter, from the measured capacity
    cap="${CAPACITY:?set CAPACITY (req/s) from the calib lines}"
    python3 "$B" dedicated --rate "$LOW" --capacity "$cap" --warmup 30 --duration 270 "${C[@]}"
    python3 "$B" dedicated --rate "$MID" --capacity "$cap" --warmup 20 --duration 30 "${C[@]}"
    python3 "$B" dedicated --rate "$HIGH" --capacity "$cap" --warmup 20 --duration 20 "${C[@]}"
}
case "${1:-all}" in
    calib) calib ;;
    low) low ;;
    mid) mid ;;
    high) high ;;
    dedicated) dedicated ;;
    all)
        calib
        # capacity: the highest calibration rate that met the SLO
        CAPACITY="$(python3 - "$OUT" "$SLO" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [r["rate"] for r in rows if r.get("kind") == "calib" and r["slo"] == float(sys.argv[2]) and r["meets_slo"]]
print(max(ok) if ok else 1)
EOF
)"
        export CAPACITY
        low
        mid
        high
        dedicated ;;
    *) echo "usage: $0 [calib|low|high|dedicated|all]" >&2; exit 2 ;;
esac
echo "logs: $LOGS" >&2
