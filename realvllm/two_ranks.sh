#!/bin/bash
# Two vLLM ranks serving one model with vLLM's native multi-node launch (no Ray), both on this
# machine, at nice 10. See docs/real-vllm.md "Multi-node: two ranks on one machine".
# usage: realvllm/two_ranks.sh tp-pp|dp [API_PORT] [LOGDIR]
# Starts rank 0 (API) and rank 1 (--headless) in their own process groups, waits up to 240 s
# for rank 0's /health, sends one chat completion, SIGKILLs rank 1's group, watches rank 0 for
# WATCH s (default 90; a chat request is sent 5 s after the kill), then kills all it started.
# Logs: LOGDIR/rank{0,1}.log, LOGDIR/events. Knobs (defaults = the runs that work):
#   EAGER_FLAG=--enforce-eager  tp-pp: reproduces the PP crash on the first request
#   DP0_START_RANK=1            dp: rank 0 also gets --data-parallel-start-rank 0 (as gang.rs
#                               does): reproduces "must not use --headless" at startup
#   NET_ENV=0                   do not set VLLM_HOST_IP / GLOO_SOCKET_IFNAME (not needed on lo)
#   VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS=30  the head fails sooner after rank 1 dies (default 300)
# Without --enforce-eager the first start compiles (torch inductor, ~150 MB in /tmp/torchinductor_$USER).
set -u
LAYOUT=${1:?tp-pp|dp}; PORT=${2:-18300}; LOGS=${3:-/tmp/two-ranks-$LAYOUT}
D=${FLOTILLA_REAL_VLLM:-$HOME/.cache/flotilla/real-vllm}
RDV=$((PORT + 1))   # rendezvous port (--master-port / --data-parallel-rpc-port)
mkdir -p "$LOGS"; : >"$LOGS/events"
export VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CACHE_ROOT=$D/cache
[ "${NET_ENV:-1}" = 1 ] && export VLLM_HOST_IP=127.0.0.1 GLOO_SOCKET_IFNAME=lo
DTYPE=(); [ "$(grep -c avx512_bf16 /proc/cpuinfo)" = 0 ] && DTYPE=(--dtype float32)
COMMON=("$D/models/tiny-llama" --served-model-name tiny --max-model-len 512 ${EAGER_FLAG:-} "${DTYPE[@]}" --tensor-parallel-size 1)
case $LAYOUT in
  tp-pp) R0=(--pipeline-parallel-size 2 --nnodes 2 --node-rank 0 --master-addr 127.0.0.1 --master-port $RDV)
         R1=(--pipeline-parallel-size 2 --nnodes 2 --node-rank 1 --master-addr 127.0.0.1 --master-port $RDV --headless);;
  dp)    DP=(--data-parallel-size 2 --data-parallel-size-local 1 --data-parallel-address 127.0.0.1 --data-parallel-rpc-port $RDV)
         R0=("${DP[@]}"); [ "${DP0_START_RANK:-0}" = 1 ] && R0+=(--data-parallel-start-rank 0); R1=("${DP[@]}" --data-parallel-start-rank 1 --headless);;
  *) echo "layout: tp-pp|dp" >&2; exit 2;;
esac
R0+=(${EXTRA0:-}); R1+=(${EXTRA1:-})
ev() { echo "$(date -u +%T) +$(( $(date +%s) - T0 ))s $*" | tee -a "$LOGS/events"; }
T0=$(date +%s)
setsid nice -n 10 "$D/venv/bin/vllm" serve "${COMMON[@]}" --host 127.0.0.1 --port "$PORT" "${R0[@]}" >"$LOGS/rank0.log" 2>&1 & P0=$!
setsid nice -n 10 "$D/venv/bin/vllm" serve "${COMMON[@]}" --host 127.0.0.1 --port $((PORT + 2)) "${R1[@]}" >"$LOGS/rank1.log" 2>&1 & P1=$!
ev "rank0 pid $P0: vllm serve ${COMMON[*]} --host 127.0.0.1 --port $PORT ${R0[*]}"
ev "rank1 pid $P1: vllm serve ${COMMON[*]} --host 127.0.0.1 --port $((PORT + 2)) ${R1[*]}"
cleanup() { kill -KILL -- -$P0 -$P1 2>/dev/null; kill $(jobs -p) 2>/dev/null; sleep 1; ev "cleanup done"; }
trap cleanup EXIT
mem() { free -m | awk '/Mem:/{print "used MB " $3}'; }
ok=0
for i in $(seq 1 240); do
  if curl -sf -m 2 "http://127.0.0.1:$PORT/health" >/dev/null; then ok=1; break; fi
  kill -0 $P0 2>/dev/null || { ev "rank0 exited (rc: $(wait $P0; echo $?))"; break; }
  sleep 1
done
[ $ok = 1 ] || { ev "no /health; rank1 alive: $(kill -0 $P1 2>/dev/null && echo yes || echo no)"; exit 1; }
ev "rank0 /health 200; $(mem)"
ps -o pid,pgid,rss,args -g $P0,$P1 | cut -c1-150 >>"$LOGS/events"
t=$(date +%s%N)
curl -s -m 60 "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"tiny","messages":[{"role":"user","content":"hello"}],"max_tokens":8,"temperature":0}' >"$LOGS/chat.json"
ev "chat completion ($(( ($(date +%s%N) - t) / 1000000 )) ms): $(head -c 400 "$LOGS/chat.json")"
kill -KILL -- -$P1; ev "SIGKILL rank1 process group"
for i in $(seq 1 ${WATCH:-90}); do
  h=$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://127.0.0.1:$PORT/health")
  alive=$(kill -0 $P0 2>/dev/null && echo alive || echo exited)
  [ "${last:-}" != "$h $alive" ] && ev "after kill: rank0 /health=$h rank0 $alive"; last="$h $alive"
  [ $alive = exited ] && break
  if [ $i = 5 ]; then
    ( c=$(curl -s -m 600 -w ' HTTP %{http_code}' "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
        -d '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'); ev "chat sent after kill answered: ${c:0:300}" ) &
  fi
  sleep 1
done
