#!/usr/bin/env bash
# Store benchmark: flotilla Apply vs etcd 3.4 put, 3 members each on loopback, fsync on.
# Builds what it needs, runs every phase, prints a table and writes bench/store/results.json.
# Everything it starts is killed on exit. See bench/store/README.md for the method.
#
# Knobs (environment): DURATION (s, measured phase, 10), WARMUP (s, 2), VALUE_SIZE (256),
# CLIENTS_HI (64), TRIALS (failover trials, 10), SYSTEMS ("flotilla etcd"),
# BENCH_DIR (parent of the temp data dirs, /var/tmp), KEEP=1 keeps data dirs and logs,
# MIX_TRIALS (failover trials after the Model mix, 0), LOAD_BELOW (wait before each phase
# until the 1-minute load is below this, at most LOAD_WAIT_S=600 s; unset: no wait), MODEL_MIX (1: also the flotilla Model-mix phases,
# 0: not), PHASE_HOOK (a program run as `HOOK start|stop SYSTEM KIND CLIENTS LEADER_PID`
# around each load phase, e.g. bench/store/perf-hook.sh to profile the leader),
# TARGET_DIR (cargo target dir, <repo>/target-bench), SKIP_BUILD=1,
# FLOTILLA_BIN (use this flotilla binary instead of building one), FLOTILLA_ARGS (extra
# `flotilla server` flags, e.g. "--heartbeat-ms 50 --election-timeout-min-ms 200
# --election-timeout-max-ms 400"), ETCD_ARGS (extra etcd flags).
set -euo pipefail
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0
# bash reports each member this script kill -9s ("... Killed ..."): expected, so hidden.
exec 2> >(grep --line-buffered -v '^[^ ]*: line [0-9]*: *[0-9]* Killed' >&2)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${TARGET_DIR:-$ROOT/target-bench}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
VALUE_SIZE=${VALUE_SIZE:-256}
CLIENTS_HI=${CLIENTS_HI:-64}
TRIALS=${TRIALS:-10}
MODEL_MIX=${MODEL_MIX:-1}
MIX_TRIALS=${MIX_TRIALS:-0}
SYSTEMS=${SYSTEMS:-"flotilla etcd"}
RESULTS=${RESULTS:-${BENCH_OUT:-$HERE}/results.json}

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- build and tools -------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building flotilla (release) and the load generator into $TARGET"
  [[ -n ${FLOTILLA_BIN:-} ]] || (cd "$ROOT" && cargo build --release -q -p flotilla --target-dir "$TARGET")
  cargo build --release -q --manifest-path "$ROOT/bench/loadgen/Cargo.toml" --target-dir "$TARGET"
fi
FLOTILLA=${FLOTILLA_BIN:-$TARGET/release/flotilla}
LOADGEN=$TARGET/release/loadgen
[[ -x $FLOTILLA && -x $LOADGEN ]] || die "missing $FLOTILLA or $LOADGEN"

if [[ " $SYSTEMS " == *" etcd "* ]] && ! command -v etcd >/dev/null; then
  log "installing etcd-server and etcd-client"
  apt-get install -y etcd-server etcd-client >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y etcd-server etcd-client >/dev/null; } ||
    die "could not install etcd-server"
fi
command -v jq >/dev/null || die "jq is required"
# The numbers mean little if something else is using the CPUs (a cargo build, say).
busy=$(ps -eo pcpu=,comm= | awk '$1 > 20 {print $2}' | paste -sd, -)
[[ -z $busy ]] || log "WARNING: busy processes while benchmarking: $busy"

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/flotilla-bench.XXXXXX")
FSTYPE=$(stat -f -c %T "$WORK")
[[ $FSTYPE == tmpfs || $FSTYPE == ramfs ]] && log "WARNING: $WORK is on $FSTYPE: fsync costs nothing there"

declare -A PID=()   # "fl1" / "etcd2" -> pid of a process this script started
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for k in "${!PID[@]}"; do kill -9 "${PID[$k]}" 2>/dev/null || true; done
  for k in "${!PID[@]}"; do wait "${PID[$k]}" 2>/dev/null || true; done
  if [[ ${KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT INT TERM

# Waits until `file` contains `pattern` or the process `name` dies (bounded).
wait_for_line() {
  local file=$1 pattern=$2 name=$3
  for _ in $(seq 1 300); do
    grep -q "$pattern" "$file" 2>/dev/null && return 0
    kill -0 "${PID[$name]}" 2>/dev/null || { tail -20 "$file" >&2; die "$name exited"; }
    sleep 0.1
  done
  tail -20 "$file" >&2
  die "$name did not start"
}

stop() { # name
  local name=$1
  [[ -n ${PID[$name]:-} ]] || return 0
  kill -9 "${PID[$name]}" 2>/dev/null || true
  wait "${PID[$name]}" 2>/dev/null || true
  unset "PID[$name]"
}

# ---- flotilla ---------------------------------------------------------------------------
read -r -a P <<<"$("$LOADGEN" ports --n 12)"
FL_GRPC=("" "${P[0]}" "${P[1]}" "${P[2]}")
FL_HTTP=("" "${P[3]}" "${P[4]}" "${P[5]}")
ETCD_CLIENT=("" "${P[6]}" "${P[7]}" "${P[8]}")
ETCD_PEER=("" "${P[9]}" "${P[10]}" "${P[11]}")
FL_EPS="127.0.0.1:${FL_GRPC[1]},127.0.0.1:${FL_GRPC[2]},127.0.0.1:${FL_GRPC[3]}"
ETCD_EPS="127.0.0.1:${ETCD_CLIENT[1]},127.0.0.1:${ETCD_CLIENT[2]},127.0.0.1:${ETCD_CLIENT[3]}"

start_flotilla() { # id [extra args...]
  local i=$1; shift
  : >"$WORK/fl$i.log"
  "$FLOTILLA" server --id "$i" --data-dir "$WORK/fl$i" \
    --grpc-addr "127.0.0.1:${FL_GRPC[$i]}" --http-addr "127.0.0.1:${FL_HTTP[$i]}" ${FLOTILLA_ARGS:-} "$@" \
    >>"$WORK/fl$i.log" 2>&1 &
  PID[fl$i]=$!
  wait_for_line "$WORK/fl$i.log" "listening grpc=" "fl$i"
}

start_etcd() { # id
  local i=$1 cluster="" j
  for j in 1 2 3; do cluster+="${cluster:+,}e$j=http://127.0.0.1:${ETCD_PEER[$j]}"; done
  etcd --name "e$i" --data-dir "$WORK/etcd$i" \
    --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
    --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token flotilla-bench ${ETCD_ARGS:-} \
    >>"$WORK/etcd$i.log" 2>&1 &
  PID[etcd$i]=$!
}

cluster_up() { # system
  case $1 in
    flotilla)
      start_flotilla 1 --bootstrap
      start_flotilla 2 --join "127.0.0.1:${FL_GRPC[1]}"
      start_flotilla 3 --join "127.0.0.1:${FL_GRPC[1]}"
      ;;
    etcd)
      start_etcd 1; start_etcd 2; start_etcd 3
      ;;
  esac
  "$LOADGEN" wait-ready --system "$1" --endpoints "$(eps "$1")" --timeout-s 60 >/dev/null
}

cluster_down() { # system
  local i pfx; pfx=$([[ $1 == flotilla ]] && echo fl || echo etcd)
  for i in 1 2 3; do stop "$pfx$i"; done
}

eps() { [[ $1 == flotilla ]] && echo "$FL_EPS" || echo "$ETCD_EPS"; }
leader_pid() { # system endpoint
  local i pfx port; pfx=$([[ $1 == flotilla ]] && echo fl || echo etcd)
  for i in 1 2 3; do
    port=$([[ $1 == flotilla ]] && echo "${FL_GRPC[$i]}" || echo "${ETCD_CLIENT[$i]}")
    [[ $2 == "127.0.0.1:$port" ]] && echo "${PID[$pfx$i]}"
  done
  return 0
}
pids() { local pfx; pfx=$([[ $1 == flotilla ]] && echo fl || echo etcd); echo "${PID[${pfx}1]},${PID[${pfx}2]},${PID[${pfx}3]}"; }

restart_member() { # system index(0-based)
  local i=$(($2 + 1))
  case $1 in
    flotilla) stop "fl$i"; start_flotilla "$i" ;;   # resumes from its data dir
    etcd) stop "etcd$i"; start_etcd "$i" ;;         # existing data dir: --initial-* ignored
  esac
}

# With LOAD_BELOW set: waits (at most LOAD_WAIT_S) until the 1-minute load average is
# below it, so a phase does not start while something else (or the last phase) still
# loads the machine; the load before and after each phase goes into the results anyway.
quiet() {
  [[ -n ${LOAD_BELOW:-} ]] || return 0
  local t0=$SECONDS
  while awk -v max="$LOAD_BELOW" '{exit !($1 >= max)}' /proc/loadavg && ((SECONDS - t0 < ${LOAD_WAIT_S:-600})); do
    sleep 5
  done
  log "load $(cut -d' ' -f1-3 /proc/loadavg) after waiting $((SECONDS - t0))s for < $LOAD_BELOW"
}

# The load phases of one kind (1 and CLIENTS_HI clients) against $leader of $sys.
phases() { # kind
  local kind=$1 c label load_before out
  for c in 1 "$CLIENTS_HI"; do
    quiet
    label=$sys-c$c; [[ $kind == tenant ]] || label=$sys-$kind-c$c
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    log "$sys $([[ $sys == etcd ]] && echo value || echo "$kind"): $c client(s), ${WARMUP}s warm-up + ${DURATION}s against leader $leader (load $load_before)"
    if [[ -n ${PHASE_HOOK:-} ]]; then "$PHASE_HOOK" start "$sys" "$kind" "$c" "$(leader_pid "$sys" "$leader")"; fi
    out=$("$LOADGEN" load --system "$sys" --kind "$kind" --endpoint "$leader" --clients "$c" \
      --duration-s "$DURATION" --warmup-s "$WARMUP" --value-size "$VALUE_SIZE" --label "$label")
    if [[ -n ${PHASE_HOOK:-} ]]; then "$PHASE_HOOK" stop "$sys" "$kind" "$c" "$(leader_pid "$sys" "$leader")"; fi
    RUNS+=("$(jq -c --arg b "$load_before" --arg a "$(cut -d' ' -f1-3 /proc/loadavg)" \
      '. + {load_before: $b, load_after: $a}' <<<"$out")")
    log "  $(jq -c '{writes_per_s, p50_ms, p99_ms, errors, first_error, load_after}' <<<"${RUNS[-1]}")"
  done
}

RUNS=()       # JSON lines of load results
FAILOVERS=()  # JSON lines of failover trials
MIX_FAILOVERS=()  # ... of those after the Model mix (MIX_TRIALS)

for sys in $SYSTEMS; do
  log "$sys: starting 3 members"
  cluster_up "$sys"
  leader=$("$LOADGEN" wait-ready --system "$sys" --endpoints "$(eps "$sys")" | jq -r .leader)
  # Store-only: flotilla writes Tenants (no leader controller reacts to them), etcd values.
  phases tenant
  quiet
  for t in $(seq 1 "$TRIALS"); do
    "$LOADGEN" wait-ready --system "$sys" --endpoints "$(eps "$sys")" --timeout-s 60 >/dev/null
    out=$("$LOADGEN" failover --system "$sys" --endpoints "$(eps "$sys")" --pids "$(pids "$sys")" \
      --value-size "$VALUE_SIZE")
    FAILOVERS+=("$(jq -c --argjson t "$t" '. + {trial: $t}' <<<"$out")")
    log "$sys failover $t: $(jq -c '{failover_ms, in_order_ms, killed_index}' <<<"$out")"
    restart_member "$sys" "$(jq -r .killed_index <<<"$out")"
  done
  # Then, flotilla only, the Model mix: Models whose label changes every write, with the
  # controllers running (model actors, Replica objects, scheduler rounds). After failover:
  # a new leader starts a controller per Model, so failover is measured on the store alone.
  if [[ $sys == flotilla && $MODEL_MIX == 1 ]]; then
    leader=$("$LOADGEN" wait-ready --system "$sys" --endpoints "$(eps "$sys")" --timeout-s 60 | jq -r .leader)
    phases model
    # Optional: failover with the Models in the store (a new leader starts their controllers).
    for t in $(seq 1 "$MIX_TRIALS"); do
      "$LOADGEN" wait-ready --system "$sys" --endpoints "$(eps "$sys")" --timeout-s 120 >/dev/null
      if out=$("$LOADGEN" failover --system "$sys" --endpoints "$(eps "$sys")" --pids "$(pids "$sys")" \
        --value-size "$VALUE_SIZE"); then
        MIX_FAILOVERS+=("$(jq -c --argjson t "$t" '. + {trial: $t}' <<<"$out")")
        killed=$(jq -r .killed_index <<<"$out")
      else
        MIX_FAILOVERS+=("$(jq -nc --argjson t "$t" '{system: "flotilla", trial: $t, failover_ms: null}')")
        # the member loadgen killed: a zombie (not yet reaped) or gone
        killed=$(for i in 1 2 3; do
          st=$(awk '/^State:/{print $2}' "/proc/${PID[fl$i]}/status" 2>/dev/null || true)
          [[ $st == Z || -z $st ]] && echo $((i - 1))
        done | head -1)
      fi
      log "$sys failover after the Model mix $t: $(jq -c '{failover_ms, in_order_ms, killed_index}' <<<"${MIX_FAILOVERS[-1]}")"
      restart_member "$sys" "$killed"
    done
  fi
  cluster_down "$sys"
done

# ---- report -----------------------------------------------------------------------------
runs_json=$(printf '%s\n' "${RUNS[@]}" | jq -s .)
fo_json=$(printf '%s\n' "${FAILOVERS[@]}" | jq -s .)
mix_fo_json=$(printf '%s\n' "${MIX_FAILOVERS[@]}" | jq -s .)
flv=$("$FLOTILLA" --version 2>/dev/null || echo "flotilla $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)")
etv=$(etcd --version 2>/dev/null | head -1 || echo "n/a")
jq -n --argjson runs "$runs_json" --argjson fo "$fo_json" --argjson mixfo "$mix_fo_json" \
  --arg date "$(date -u +%FT%TZ)" --arg host "$(uname -srm), $(nproc) cpus, $(free -g | awk '/Mem:/{print $2}') GiB" \
  --arg flv "$flv" --arg etv "$etv" --arg fs "$FSTYPE" --argjson vs "$VALUE_SIZE" --argjson hi "$CLIENTS_HI" \
  --arg flargs "${FLOTILLA_ARGS:-}" --arg etargs "${ETCD_ARGS:-}" --argjson dur "$DURATION" --argjson warm "$WARMUP" '
  def pick($s; $c): ($runs | map(select(.system == $s and .clients == $c and .kind != "model")) | first);
  def nr($xs; $p): ($xs | sort) as $s | if ($s | length) == 0 then null
    else $s[([(($p / 100 * ($s | length)) | ceil), 1] | max) - 1] end;
  def fo($s): ($fo | map(select(.system == $s))) as $t | ($t | map(.failover_ms)) as $x
    | ($t | map(.in_order_ms)) as $y
    | {trials: ($x | length), p50_ms: nr($x; 50), max_ms: ($x | max), all_ms: $x,
       in_order_p50_ms: nr($y; 50), in_order_max_ms: ($y | max), in_order_all_ms: $y};
  def ratio($a; $b): if $a == null or $b == null or $b == 0 then null else $a / $b end;
  {
    date: $date, machine: $host, data_fs: $fs, flotilla: $flv, etcd: $etv, value_size: $vs,
    flotilla_args: $flargs, etcd_args: $etargs, duration_s: $dur, warmup_s: $warm,
    runs: $runs,
    ratios_flotilla_over_etcd: ([1, $hi] | map(. as $c | {
      clients: $c,
      writes_per_s: ratio(pick("flotilla"; $c).writes_per_s; pick("etcd"; $c).writes_per_s),
      p50: ratio(pick("flotilla"; $c).p50_ms; pick("etcd"; $c).p50_ms),
      p99: ratio(pick("flotilla"; $c).p99_ms; pick("etcd"; $c).p99_ms)
    })),
    failover: {flotilla: fo("flotilla"), etcd: fo("etcd"), trials: $fo},
    failover_after_model_mix: $mixfo
  }' >"$RESULTS"

{
  printf '\n%-9s %-7s %7s %12s %9s %9s %7s\n' system kind clients writes/s p50_ms p99_ms errors
  jq -r '.runs[] | [.system, .kind, .clients, (.writes_per_s|floor), (.p50_ms*100|round/100), (.p99_ms*100|round/100), .errors] | @tsv' "$RESULTS" |
    while IFS=$'\t' read -r s k c w p50 p99 e; do printf '%-9s %-7s %7s %12s %9s %9s %7s\n' "$s" "$k" "$c" "$w" "$p50" "$p99" "$e"; done
  printf '\nratio flotilla/etcd, store-only (writes/s higher is better; latency lower is better)\n'
  jq -r '.ratios_flotilla_over_etcd[] | "  clients=\(.clients): writes/s x\(.writes_per_s*100|round/100)  p50 x\(.p50*100|round/100)  p99 x\(.p99*100|round/100)"' "$RESULTS" 2>/dev/null || true
  printf '\nfailover: kill -9 leader -> next successful write (ms)\n'
  printf '  %-9s %6s %10s %10s %16s %16s\n' system trials p50 max in-order_p50 in-order_max
  jq -r '.failover | to_entries[] | select(.key != "trials" and .value.trials > 0) | [.key, .value.trials, .value.p50_ms, .value.max_ms, .value.in_order_p50_ms, .value.in_order_max_ms] | map(if type == "number" then (. * 10 | round / 10) else . end) | @tsv' "$RESULTS" |
    while IFS=$'\t' read -r s n p m ip im; do printf '  %-9s %6s %10s %10s %16s %16s\n' "$s" "$n" "$p" "$m" "$ip" "$im"; done
  printf '\nresults: %s\n' "$RESULTS"
}
