#!/usr/bin/env python3
"""Dense LoRA serving (flotilla, on-demand adapters) vs one dedicated replica per adapter.

Stdlib only. Every run starts a fresh one-process flotilla stack (`flotilla dev`: one
server, one agent with N simulated GPUs, the gateway), applies a base model and adapters,
replays a seeded trace through the gateway with streaming completions, and measures TTFT
at the client (send -> first SSE event with non-empty text).

Trace: A adapters (default 200) with Zipf popularity p_k ~ 1/k^s (s=1.0) over a seeded
random permutation of the names, Poisson arrivals at total rate R, prompt 200..500 tokens
(uniform; random 5-letter words, one sim token each), max_tokens 64..128 (uniform),
ignore_eos so every request generates max_tokens. The first --warmup seconds are replayed
but not measured (caches and adapter placement reach steady state); the next --duration
seconds are measured.

Subcommands (each prints one JSON line per run, and appends it to --out if given):
  dense  --rate R --replicas N        base model, A on-demand adapters, N replicas
  search --rate R --slo S [--start N] the fewest N with TTFT p99 <= S (upward from
                                      --start; if --start passes, downward until a fail)
  calib  --rates R1,R2,...            one replica of the base model without LoRA, requests
                                      for the base model: TTFT per rate (SLO capacity)
  dedicated --rate R --capacity C     GPUs for one replica per active adapter, from the trace
                                      and a measured per-replica capacity C (no run)

$FLOTILLA_BIN is the `flotilla` binary (bench/lora/run.sh builds it).
"""
import argparse
import asyncio
import bisect
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SEED = 20261126
ADAPTERS = 200
ZIPF_S = 1.0
MAX_LORAS = int(os.environ.get("MAX_LORAS", "8"))  # env: the slot-starved runs of RESULTS.md
MAX_CPU_LORAS = int(os.environ.get("MAX_CPU_LORAS", "32"))
RANK = 16
PROFILE = "a100-llama3-8b"
REQ_TIMEOUT = 120.0


def bin_path():
    b = os.environ.get("FLOTILLA_BIN")
    if not b:
        sys.exit("set FLOTILLA_BIN to the flotilla binary (bench/lora/run.sh does)")
    return b


# ---------------------------------------------------------------- trace

def adapter_names(n):
    return [f"lora-{i:03d}" for i in range(n)]


def zipf_popularity(n, s, seed):
    """Name -> probability; rank order is a seeded permutation of the names."""
    names = adapter_names(n)
    order = names[:]
    random.Random(seed ^ 0x5EED).shuffle(order)
    w = [1.0 / (k ** s) for k in range(1, n + 1)]
    tot = sum(w)
    return {name: w[k] / tot for k, name in enumerate(order)}, order


WORDS = None


def words():
    global WORDS
    if WORDS is None:
        rng = random.Random(7)
        letters = "abcdefghijklmnopqrstuvwxyz"
        WORDS = ["".join(rng.choice(letters) for _ in range(5)) for _ in range(4096)]
    return WORDS


def gen_trace(seed, rate, seconds, n_adapters, s, models=None):
    """[(t, model, prompt_tokens, max_tokens)], sorted by t."""
    rng = random.Random(seed * 1000003 + int(rate * 1000))
    pop, order = zipf_popularity(n_adapters, s, seed)
    cum = []
    acc = 0.0
    for name in order:
        acc += pop[name]
        cum.append(acc)
    out = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        k = min(bisect.bisect_left(cum, rng.random() * acc), len(order) - 1)
        model = models if models else order[k]
        out.append((t, model, rng.randint(200, 500), rng.randint(64, 128)))
    return out


def prompt_text(rng, ntok):
    w = words()
    # " " + 5 letters is one sim token; the template adds none for /v1/completions
    return " ".join(rng.choice(w) for _ in range(ntok))


# ---------------------------------------------------------------- HTTP client

async def stream_request(port, body, t_sched, t0):
    """One streaming completion. Returns dict(ok, ttft, e2e, status, err)."""
    data = json.dumps(body).encode()
    start = time.monotonic()
    res = {"ok": False, "ttft": None, "e2e": None, "status": 0, "err": "", "lag": start - (t0 + t_sched)}
    w = None
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: " + str(len(data)).encode() +
                b"\r\n\r\n" + data)
        await w.drain()
        status_line = await r.readline()
        try:
            res["status"] = int(status_line.split()[1])
        except (IndexError, ValueError):
            res["err"] = f"bad status line {status_line[:60]!r}"
            return res
        chunked = False
        clen = None
        while True:
            h = await r.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin1").partition(":")
            k = k.strip().lower()
            if k == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
            elif k == "content-length":
                clen = int(v.strip())
        if res["status"] != 200:
            body_b = await r.read(4096) if clen is None else await r.readexactly(min(clen, 4096))
            res["err"] = body_b.decode("utf-8", "replace")[:300]
            return res

        async def chunks():
            if chunked:
                while True:
                    line = await r.readline()
                    if not line:
                        return
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        return
                    c = await r.readexactly(size)
                    await r.readexactly(2)
                    yield c
            else:
                while True:
                    c = await r.read(65536)
                    if not c:
                        return
                    yield c

        buf = b""
        got_first = False
        done = False
        async for c in chunks():
            buf += c
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                ev = ev.strip()
                if not ev.startswith(b"data:"):
                    continue
                payload = ev[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                if not got_first:
                    try:
                        j = json.loads(payload)
                    except ValueError:
                        continue
                    if "error" in j:
                        res["err"] = str(j["error"])[:300]
                        return res
                    ch = j.get("choices") or []
                    if ch and (ch[0].get("text") or (ch[0].get("delta") or {}).get("content")):
                        res["ttft"] = time.monotonic() - start
                        got_first = True
                elif b'"error"' in payload:
                    res["err"] = payload.decode("utf-8", "replace")[:300]
                    return res
            if done:
                break
        res["e2e"] = time.monotonic() - start
        if not done:
            res["err"] = "stream ended without [DONE]"
        elif not got_first:
            res["err"] = "no content"
        else:
            res["ok"] = True
        return res
    except Exception as e:  # noqa: BLE001 - every failure is a counted error
        res["err"] = f"{type(e).__name__}: {e}"[:300]
        return res
    finally:
        if w is not None:
            w.close()


async def simple_http(port, method, path, body=None, timeout=10.0):
    data = json.dumps(body).encode() if body is not None else b""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        w.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await w.drain()
        out = await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()
    head, _, rest = out.partition(b"\r\n\r\n")
    code = int(head.split()[1]) if head else 0
    if b"transfer-encoding: chunked" in head.lower():
        body_b = b""
        while rest:
            line, _, rest = rest.partition(b"\r\n")
            n = int(line.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            body_b += rest[:n]
            rest = rest[n + 2:]
        rest = body_b
    return code, rest.decode("utf-8", "replace")


def metric_sum(text, name):
    """Sum of all samples of one metric name (any labels)."""
    tot = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            try:
                tot += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return tot


def buckets(text, name):
    """{le: cumulative count} of one histogram (any other labels summed)."""
    out = {}
    for line in text.splitlines():
        if not line.startswith(name + "_bucket{"):
            continue
        m = re.search(r'le="([^"]+)"', line)
        if not m:
            continue
        le = math.inf if m.group(1) == "+Inf" else float(m.group(1))
        out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def hist_quantile(b0, b1, q):
    """Prometheus histogram_quantile over the increase b1 - b0: linear within a bucket."""
    les = sorted(b1)
    cum = [b1[le] - b0.get(le, 0.0) for le in les]
    if not cum or cum[-1] <= 0:
        return None
    rank = q * cum[-1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in zip(les, cum):
        if c >= rank:
            if le == math.inf:
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_le, prev_c = le, c
    return prev_le


async def gateway_metrics(port):
    try:
        code, text = await simple_http(port, "GET", "/metrics")
        return text if code == 200 else ""
    except Exception:  # noqa: BLE001
        return ""


# ---------------------------------------------------------------- stack

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Stack:
    """`flotilla dev` with N simulated GPUs and no demo model."""

    def __init__(self, gpus, log_dir):
        self.dir = tempfile.mkdtemp(prefix="flotilla-lora-bench-")
        self.grpc = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.gw_port = free_port()
        self.log = open(os.path.join(log_dir, f"dev-{int(time.time())}-{gpus}.log"), "w")
        cmd = [bin_path(), "dev", "--no-demo", "--data-dir", self.dir, "--grpc-addr", self.grpc,
               "--http-addr", self.http, "--gateway-addr", f"127.0.0.1:{self.gw_port}",
               "--gpus", str(gpus), f"--sim-args=--profile {PROFILE}"]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                  env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            if "flotilla dev ready" in line:
                return
        self.stop()
        sys.exit("flotilla dev did not start (see the dev log in the log dir)")

    def cli(self, *args, stdin=None):
        r = subprocess.run([bin_path(), "--server", self.grpc, *args], input=stdin, capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"flotilla {' '.join(args)}: {r.stderr.strip()[:500]}")
        return r.stdout

    def apply(self, manifest):
        for attempt in range(50):
            try:
                return self.cli("apply", "-f", "-", stdin=manifest)
            except RuntimeError:
                if attempt == 49:
                    raise
                time.sleep(0.2)

    def ready_replicas(self, model):
        out = self.cli("get", "replicas", "-l", f"model={model}", "-o", "json")
        try:
            objs = json.loads(out)
        except ValueError:
            objs = [json.loads(l) for l in out.splitlines() if l.strip()]
        if isinstance(objs, dict):
            objs = objs.get("items") or objs.get("objects") or [objs]
        n = 0
        for o in objs:
            st = o.get("status") or {}
            if isinstance(st, str):
                st = json.loads(st or "{}")
            if st.get("phase") == "Ready":
                n += 1
        return n

    def wait_ready(self, model, n, secs=180):
        deadline = time.time() + secs
        while time.time() < deadline:
            try:
                if self.ready_replicas(model) >= n:
                    return
            except RuntimeError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{model}: {n} replicas not Ready within {secs}s")

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class StaticStack:
    """What users run without flotilla: N engines, each started with every adapter
    preloaded (`--lora-modules`, static multi-LoRA), behind vllm-router round_robin."""

    def __init__(self, replicas, adapters, cpu_loras, log_dir):
        venv = os.environ.get("BENCH_VENV", "/tmp/benchvenv/venv")
        router = os.path.join(venv, "bin", "vllm-router")
        if not os.path.exists(router):
            sys.exit(f"no vllm-router at {router}: python3 -m venv {venv} && {venv}/bin/pip install vllm-router")
        self.procs = []
        self.logs = []
        modules = [f"{a}=sim://{a}?rank={RANK}" for a in adapter_names(adapters)]
        urls = []
        stamp = int(time.time())
        for i in range(replicas):
            port = free_port()
            log = open(os.path.join(log_dir, f"static-sim-{stamp}-{i}.log"), "w")
            cmd = [bin_path(), "sim", "--port", str(port), "--model", "base", "--profile", PROFILE,
                   "--max-loras", str(MAX_LORAS), "--max-cpu-loras", str(cpu_loras), "--max-lora-rank", str(RANK),
                   "--lora-modules", *modules]
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
            self.logs.append(log)
            urls.append(f"http://127.0.0.1:{port}")
        self.port = free_port()
        log = open(os.path.join(log_dir, f"static-router-{stamp}.log"), "w")
        self.procs.append(subprocess.Popen(
            [router, "--host", "127.0.0.1", "--port", str(self.port), "--worker-urls", *urls,
             "--policy", "round_robin", "--prometheus-port", str(free_port()), "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=log))
        self.logs.append(log)

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


def base_manifest(replicas, lora):
    args = (f"[--max-loras, '{MAX_LORAS}', --max-cpu-loras, '{MAX_CPU_LORAS}', --max-lora-rank, '{RANK}']"
            if lora else "[--disable-lora]")
    return (f"kind: Model\nmetadata: {{name: base}}\nspec: {{engine: sim, source: 'file:///models/base', "
            f"replicas: {replicas}, gpus: 1, engine_args: {args}}}\n")


def adapters_manifest(n):
    docs = [f"kind: Adapter\nmetadata: {{name: {a}}}\nspec: {{base_model: base, source: 'sim://{a}?rank={RANK}', "
            f"rank: {RANK}, replicas: on-demand}}\n" for a in adapter_names(n)]
    return "---\n".join(docs)


# ---------------------------------------------------------------- one run

def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, math.ceil(p / 100.0 * len(xs)) - 1))
    return xs[k]


async def replay(port, trace, warmup, seed):
    """Fires every request of the trace at its time; returns per-request results (with t, model)."""
    rng = random.Random(seed)
    bodies = [{"model": m, "prompt": prompt_text(rng, pl), "max_tokens": mt, "stream": True,
               "ignore_eos": True, "temperature": 0} for (_, m, pl, mt) in trace]
    results = [None] * len(trace)
    metrics_at = {}
    t0 = time.monotonic() + 0.5

    async def guarded(i):
        try:
            results[i] = await asyncio.wait_for(stream_request(port, bodies[i], trace[i][0], t0), REQ_TIMEOUT)
        except asyncio.TimeoutError:
            results[i] = {"ok": False, "ttft": None, "e2e": None, "status": 0, "err": "client timeout", "lag": 0}

    async def snap(at, key):
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        metrics_at[key] = await gateway_metrics(port)

    tasks = []
    snaps = [asyncio.create_task(snap(warmup, "start"))]
    for i, (t, _, _, _) in enumerate(trace):
        d = t0 + t - time.monotonic()
        if d > 0:
            await asyncio.sleep(d)
        tasks.append(asyncio.create_task(guarded(i)))
    await asyncio.gather(*tasks)
    metrics_at["end"] = await gateway_metrics(port)
    await asyncio.gather(*snaps)
    return results, metrics_at


async def warm_first(port, model, secs=60):
    """Waits until the gateway serves `model` (its table may lag the replicas)."""
    deadline = time.time() + secs
    last = ""
    while time.time() < deadline:
        body = {"model": model, "prompt": "hello", "max_tokens": 2, "stream": True, "ignore_eos": True}
        r = await stream_request(port, body, 0, time.monotonic())
        if r["ok"]:
            return
        last = r["err"] or str(r["status"])
        await asyncio.sleep(0.3)
    raise RuntimeError(f"gateway never served {model}: {last}")


def error_kinds(errs):
    """Failed requests by HTTP status and error code."""
    out = {}
    for e in errs:
        m = re.search(r'"code":\s*"?([A-Za-z0-9_]+)', e["err"] or "")
        k = f'{e["status"]}:{m.group(1) if m else (e["err"] or "?")[:40]}'
        out[k] = out.get(k, 0) + 1
    return out


def summarize(kind, args_d, trace, results, warmup, metrics_at, extra=None):
    meas = [(tr, r) for tr, r in zip(trace, results) if tr[0] >= warmup]
    ok = [r for _, r in meas if r["ok"]]
    errs = [r for _, r in meas if not r["ok"]]
    ttft = [r["ttft"] for r in ok]
    lag = [r["lag"] for _, r in meas]
    counts = {}
    for tr, _ in meas:
        counts[tr[1]] = counts.get(tr[1], 0) + 1
    m0, m1 = metrics_at.get("start", ""), metrics_at.get("end", "")
    cold = metric_sum(m1, "flotilla_gateway_adapter_cold_loads_total") - \
        metric_sum(m0, "flotilla_gateway_adapter_cold_loads_total")
    waited = metric_sum(m1, "flotilla_gateway_adapter_cold_load_seconds_count") - \
        metric_sum(m0, "flotilla_gateway_adapter_cold_load_seconds_count")
    wait_sum = metric_sum(m1, "flotilla_gateway_adapter_cold_load_seconds_sum") - \
        metric_sum(m0, "flotilla_gateway_adapter_cold_load_seconds_sum")
    hb0 = buckets(m0, "flotilla_gateway_adapter_cold_load_seconds")
    hb1 = buckets(m1, "flotilla_gateway_adapter_cold_load_seconds")
    load_errs = metric_sum(m1, "flotilla_gateway_adapter_load_errors_total") - \
        metric_sum(m0, "flotilla_gateway_adapter_load_errors_total")
    out = {
        "kind": kind, **args_d,
        "requests": len(meas), "warmup_requests": len(trace) - len(meas), "ok": len(ok), "errors": len(errs),
        "active_models": len(counts),
        "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99), "ttft_max": pct(ttft, 100),
        "e2e_p50": pct([r["e2e"] for r in ok], 50),
        "send_lag_max": max(lag) if lag else None,
        "cold_loads": cold, "cold_load_rate": (cold / len(meas)) if meas else None,
        "requests_waited_for_load": waited,
        "mean_load_wait_s": (wait_sum / waited) if waited else None,
        # histogram_quantile of the waits (buckets 0.05, 0.1, 0.25, 0.5, 1, 2, 5 s...)
        "load_wait_p50_s": hist_quantile(hb0, hb1, 0.50),
        "load_wait_p99_s": hist_quantile(hb0, hb1, 0.99),
        "load_errors": load_errs,
        "error_kinds": error_kinds(errs),
        "error_samples": sorted({e["err"] or str(e["status"]) for e in errs})[:3],
    }
    if extra:
        out.update(extra)
    for k, v in out.items():
        if isinstance(v, float):
            out[k] = round(v, 4)
    return out


def emit(res, out_path):
    line = json.dumps(res)
    print(line, flush=True)
    if out_path:
        with open(out_path, "a") as f:
            f.write(line + "\n")


def run_trace(a):
    """The run's trace: seeded, warm-up included, capped at --max-requests."""
    trace = gen_trace(a.seed, a.rate, a.warmup + a.duration, a.adapters, a.zipf_s)
    return trace[:a.max_requests]


def report(kind, a, replicas, cpu_loras, trace, results, metrics_at, setup_s, t_start):
    """Summarizes one run against the SLO, prints it and appends it to --out."""
    res = summarize(kind, {"rate": a.rate, "replicas": replicas, "seed": a.seed, "warmup_s": a.warmup,
                           "duration_s": a.duration, "adapters": a.adapters, "zipf_s": a.zipf_s,
                           "max_loras": MAX_LORAS, "max_cpu_loras": cpu_loras},
                    trace, results, a.warmup, metrics_at,
                    {"slo": a.slo, "meets_slo": None, "setup_s": round(setup_s, 1),
                     "wall_s": round(time.time() - t_start, 1)})
    res["meets_slo"] = bool(res["errors"] == 0 and res["ttft_p99"] is not None and res["ttft_p99"] <= a.slo)
    emit(res, a.out)
    return res


def run_dense(a, replicas):
    trace = run_trace(a)
    st = Stack(replicas, a.log_dir)
    t_start = time.time()
    try:
        st.apply(base_manifest(replicas, True))
        st.wait_ready("base", replicas)
        st.apply(adapters_manifest(a.adapters))
        asyncio.run(warm_first(st.gw_port, "base"))
        asyncio.run(warm_first(st.gw_port, adapter_names(a.adapters)[0]))
        setup_s = time.time() - t_start
        results, metrics_at = asyncio.run(replay(st.gw_port, trace, a.warmup, a.seed))
    finally:
        st.stop()
    dump = os.environ.get("LORA_BENCH_DUMP")
    if dump:
        # One line per request (schedule time, adapter, lengths, outcome): for looking into a tail.
        with open(dump, "w") as f:
            for (t, m, pl, mt), r in zip(trace, results):
                f.write(json.dumps({"t": round(t, 3), "model": m, "prompt_len": pl, "max_tokens": mt,
                                    "ttft": r["ttft"], "status": r["status"], "lag": round(r["lag"], 4)}) + "\n")
    return report("dense", a, replicas, MAX_CPU_LORAS, trace, results, metrics_at, setup_s, t_start)


def cmd_dense(a):
    run_dense(a, a.replicas)


def cmd_static(a):
    """The same trace and SLO against static multi-LoRA engines behind vllm-router."""
    trace = run_trace(a)
    cpu_loras = a.cpu_loras or a.adapters
    st = StaticStack(a.replicas, a.adapters, cpu_loras, a.log_dir)
    t_start = time.time()
    try:
        asyncio.run(warm_first(st.port, adapter_names(a.adapters)[0], secs=120))
        setup_s = time.time() - t_start
        results, metrics_at = asyncio.run(replay(st.port, trace, a.warmup, a.seed))
    finally:
        st.stop()
    return report("static-vllm-router", a, a.replicas, cpu_loras, trace, results, metrics_at, setup_s, t_start)


def cmd_search(a):
    tried = {}

    def ok(n):
        if n not in tried:
            tried[n] = run_dense(a, n)["meets_slo"]
        return tried[n]

    n = a.start
    if ok(n):
        while n > 1 and ok(n - 1):
            n -= 1
    else:
        while n < a.max_replicas and not ok(n + 1):
            n += 1
        n += 1
        if not tried.get(n):
            n = None
    emit({"kind": "search", "rate": a.rate, "slo": a.slo, "fewest_replicas": n,
          "tried": {str(k): v for k, v in sorted(tried.items())}}, a.out)


def cmd_calib(a):
    for rate in [float(x) for x in a.rates.split(",")]:
        trace = gen_trace(a.seed, rate, a.warmup + a.duration, 1, 1.0, models="base")
        trace = trace[:a.max_requests]
        st = Stack(1, a.log_dir)
        t_start = time.time()
        try:
            st.apply(base_manifest(1, False))
            st.wait_ready("base", 1)
            asyncio.run(warm_first(st.gw_port, "base"))
            results, metrics_at = asyncio.run(replay(st.gw_port, trace, a.warmup, a.seed))
        finally:
            st.stop()
        res = summarize("calib", {"rate": rate, "replicas": 1, "seed": a.seed, "warmup_s": a.warmup,
                                  "duration_s": a.duration, "lora": False}, trace, results, a.warmup, metrics_at,
                        {"slo": a.slo, "wall_s": round(time.time() - t_start, 1)})
        res["meets_slo"] = bool(res["errors"] == 0 and res["ttft_p99"] is not None and res["ttft_p99"] <= a.slo)
        emit(res, a.out)


def cmd_dedicated(a):
    trace = run_trace(a)
    meas = [t for t in trace if t[0] >= a.warmup]
    active = sorted({t[1] for t in meas})
    pop, _ = zipf_popularity(a.adapters, a.zipf_s, a.seed)
    gpus = 0
    extra = 0
    hottest = max(pop.values()) * a.rate
    for name in active:
        need = max(1, math.ceil(a.rate * pop[name] / a.capacity))
        gpus += need
        extra += need - 1
    gpus_all = sum(max(1, math.ceil(a.rate * p / a.capacity)) for p in pop.values())
    emit({"kind": "dedicated", "rate": a.rate, "seed": a.seed, "requests": len(meas), "active_adapters": len(active),
          "capacity_per_replica": a.capacity, "hottest_adapter_rate": round(hottest, 3),
          "extra_replicas_for_hot_adapters": extra, "gpus": gpus,
          "gpus_if_all_adapters_active": gpus_all}, a.out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--seed", type=int, default=SEED)
        sp.add_argument("--adapters", type=int, default=ADAPTERS)
        sp.add_argument("--zipf-s", type=float, default=ZIPF_S)
        sp.add_argument("--warmup", type=float, default=30.0, help="seconds replayed but not measured")
        sp.add_argument("--duration", type=float, default=60.0, help="measured seconds")
        sp.add_argument("--max-requests", type=int, default=5000, help="cap on requests per run")
        sp.add_argument("--slo", type=float, default=1.0, help="TTFT p99 SLO, seconds")
        sp.add_argument("--out", default="")
        sp.add_argument("--log-dir", default=tempfile.gettempdir())

    d = sub.add_parser("dense")
    common(d)
    d.add_argument("--rate", type=float, required=True)
    d.add_argument("--replicas", type=int, required=True)
    s = sub.add_parser("search")
    common(s)
    s.add_argument("--rate", type=float, required=True)
    s.add_argument("--start", type=int, default=1)
    s.add_argument("--max-replicas", type=int, default=16)
    c = sub.add_parser("calib")
    common(c)
    c.add_argument("--rates", required=True)
    st = sub.add_parser("static", help="every adapter preloaded (--lora-modules) on each engine, "
                        "behind vllm-router round_robin (BENCH_VENV, default /tmp/benchvenv/venv)")
    common(st)
    st.add_argument("--rate", type=float, required=True)
    st.add_argument("--replicas", type=int, required=True)
    st.add_argument("--cpu-loras", type=int, default=0,
                    help="each engine's --max-cpu-loras (default: every adapter, so none is reloaded)")
    e = sub.add_parser("dedicated")
    common(e)
    e.add_argument("--rate", type=float, required=True)
    e.add_argument("--capacity", type=float, required=True, help="one replica's SLO capacity, req/s")
    a = p.parse_args()
    cmds = {"dense": cmd_dense, "search": cmd_search, "calib": cmd_calib, "static": cmd_static,
            "dedicated": cmd_dedicated}
    cmds[a.cmd](a)


if __name__ == "__main__":
    main()
