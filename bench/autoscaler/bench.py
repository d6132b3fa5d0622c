#!/usr/bin/env python3
"""Autoscaler benchmark: replay a seeded synthetic trace (diurnal base + bursts) through a
real flotilla stack (server --bootstrap, one agent running `flotilla sim` engines with a
simulated start time, one gateway) under KPA, APA, SLO, an HPA-style baseline and static
peak provisioning; report SLO attainment (client-measured streaming TTFT), GPU-hours and
scaling events, all in simulated time.

Time scaling: sims run at --speedup K; the trace's arrival times, the autoscaling windows
and delays and the SLO's latency target are divided by K (the control plane runs in wall
time); client latencies are multiplied by K. Stdlib only.

Usage: bench.py calibrate|run|trace ... (see run.sh).
"""
import argparse
import asyncio
import gzip
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- trace generator
def rate_at(t, p):
    """Arrival rate (requests per simulated second) at simulated time t: a diurnal base
    (one cosine hump over the trace: base_min at both ends, base_max in the middle) plus
    rectangular bursts."""
    T = p["duration_s"]
    r = p["base_min"] + (p["base_max"] - p["base_min"]) * (1 - math.cos(2 * math.pi * t / T)) / 2
    for start, length, extra in p["bursts"]:
        if start <= t < start + length:
            r += extra
    return r


def trace_params(duration_s, shape="diurnal", seed=0):
    """The trace's rate function. `diurnal` (the trace targets were chosen on): one cosine
    hump plus three bursts. `spikes` (held out, to judge the chosen targets on): a flat
    base with a train of short spikes at seeded times, none of which the diurnal trace has."""
    f = duration_s / 3600.0  # burst times scale with the trace length
    if shape == "spikes":
        rng = random.Random(seed ^ 0x5B1C)
        spikes, t = [], 240.0 * f
        while t < duration_s - 120 * f:
            length = int(rng.uniform(45, 90) * f) or 30
            spikes.append((int(t), length, round(rng.uniform(2.5, 4.0), 2)))
            t += rng.uniform(300, 480) * f
        return {"duration_s": duration_s, "base_min": 1.2, "base_max": 1.2, "bursts": spikes}
    return {
        "duration_s": duration_s,
        "base_min": 0.6,
        "base_max": 3.6,
        # (start s, length s, extra req/s)
        "bursts": [(int(600 * f), int(240 * f) or 60, 2.0), (int(1900 * f), int(120 * f) or 60, 3.0),
                   (int(2900 * f), int(180 * f) or 60, 2.0)],
    }


def gen_trace(seed, p):
    """Non-homogeneous Poisson arrivals by thinning (seeded): sorted simulated seconds."""
    rng = random.Random(seed)
    T = p["duration_s"]
    rmax = max(rate_at(t, p) for t in range(int(T) + 1)) * 1.01
    out, t = [], 0.0
    for _ in range(10_000_000):
        t += rng.expovariate(rmax)
        if t >= T:
            break
        if rng.random() < rate_at(t, p) / rmax:
            out.append(round(t, 4))
    return out


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def prompt(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words))


# ---------------------------------------------------------------- processes
class Stack:
    """server + agent (sim engines) + gateway, each in its own process group; engines are
    found by the marker in their --seed and killed by pid."""

    def __init__(self, binary, k, gpus, sim_extra, log_dir):
        self.bin, self.k, self.procs = binary, k, []
        self.marker = 1_000_000_000 + (os.getpid() * 7919 + time.time_ns()) % 1_000_000_000
        self.dir = tempfile.mkdtemp(prefix="asb-")
        self.log_dir = log_dir
        env = dict(os.environ, RUST_LOG="error")
        srv = self._spawn("server", [binary, "server", "--id", "1", "--grpc-addr", "127.0.0.1:0",
                                     "--http-addr", "127.0.0.1:0", "--data-dir", f"{self.dir}/s1",
                                     "--bootstrap"], env, banner=True)
        line = self._banner(srv)
        self.grpc = next(w[5:] for w in line.split() if w.startswith("grpc="))
        http = [w[5:] for w in line.split() if w.startswith("http=")]
        self.http = http[0] if http else None
        self._wait(lambda: self.cli("get", "model", check=False) is not None, 30, "server")
        sim_args = f"--speedup {k} --seed {self.marker} {sim_extra}"
        self._spawn("agent", [binary, "agent", "--server", self.grpc, "--node-name", "node-1", "--gpus",
                              str(gpus), "--gpu-type", "A100-80GB", "--heartbeat-interval-ms", "200",
                              "--data-dir", f"{self.dir}/agent", f"--sim-args={sim_args}"], env)
        gw = self._spawn("gateway", [binary, "--server", self.grpc, "gateway", "--listen", "127.0.0.1:0",
                                     "--no-auth", "--demand-report-interval-ms", "500"], env, banner=True)
        self.gateway = self._banner(gw).split("http://")[1].split()[0].strip()

    def _spawn(self, name, argv, env, banner=False):
        err = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE if banner else subprocess.DEVNULL,
                             stderr=err, start_new_session=True)
        self.procs.append(p)
        return p

    @staticmethod
    def _banner(p):
        line = p.stdout.readline().decode()
        if not line:
            raise RuntimeError("no banner")
        return line

    @staticmethod
    def _wait(pred, secs, what):
        deadline = time.time() + secs
        while time.time() < deadline:
            if pred():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}")

    def cli(self, *args, check=True, stdin=None):
        r = subprocess.run([self.bin, "--server", self.grpc, "-o", "json", *args], input=stdin,
                           capture_output=True, timeout=20)
        if r.returncode != 0:
            if check:
                raise RuntimeError(f"flotilla {' '.join(args)}: {r.stderr.decode()}")
            return None
        try:
            return json.loads(r.stdout or b"null")
        except ValueError:
            return r.stdout.decode()

    def model(self, name):
        try:
            return self.cli("get", "model", name, check=False)
        except subprocess.TimeoutExpired:
            return None

    def engine_pids(self):
        needle = f"--seed\0{self.marker}\0".encode()
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{d}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in cmd and st != "Z":
                pids.append(int(d))
        return pids

    def close(self):
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(3):
            for pid in self.engine_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.2)
        subprocess.run(["rm", "-rf", self.dir])


def ready_count(model_json):
    st = (model_json or {}).get("status") or {}
    for k in ("ready_replicas", "readyReplicas", "ready"):
        if isinstance(st.get(k), int):
            return st[k]
    return None


# ---------------------------------------------------------------- client
async def one_request(host, port, body, timeout):
    """Streams one completion; (status, ttft_wall_s or None, total_wall_s, ok)."""
    t0 = time.perf_counter()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        data = body.encode()
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        await w.drain()
        buf, ttft, status = b"", None, 0
        deadline = t0 + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            chunk = await asyncio.wait_for(r.read(65536), left)
            if not chunk:
                break
            buf += chunk
            if not status and b"\r\n" in buf:
                try:
                    status = int(buf.split(b"\r\n", 1)[0].split()[1])
                except (IndexError, ValueError):
                    status = -1
            if ttft is None and b"data: {" in buf:
                ttft = time.perf_counter() - t0
        w.close()
        ok = status == 200 and b"[DONE]" in buf
        return status, ttft, time.perf_counter() - t0, ok
    except (OSError, asyncio.TimeoutError):
        return 0, None, time.perf_counter() - t0, False


async def replay(gateway, model, arrivals, k, seed, prompt_words, max_tokens, max_inflight=3000):
    """Sends each arrival at arrival/k wall seconds after start; returns per-request records
    in simulated seconds."""
    host, port = gateway.rsplit(":", 1)
    rng = random.Random(seed + 1)
    sem = asyncio.Semaphore(max_inflight)
    results = [None] * len(arrivals)
    start = time.perf_counter()

    async def go(i, t):
        async with sem:
            body = json.dumps({"model": model, "prompt": prompt(rng, prompt_words), "max_tokens": max_tokens,
                               "ignore_eos": True, "stream": True})
            sent = time.perf_counter()
            st, ttft, total, ok = await one_request(host, int(port), body, 600.0 / 1)
            results[i] = {"t": t, "lag": (sent - start - t / k) * k, "status": st, "ok": ok,
                          "ttft": ttft * k if ttft is not None else None, "e2e": total * k}

    tasks = []
    for i, t in enumerate(arrivals):
        delay = start + t / k - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(go(i, t)))
    await asyncio.gather(*tasks)
    return results


# ---------------------------------------------------------------- sampling
class Sampler(threading.Thread):
    """Every 0.5 s wall: engine processes (running = starting or ready or draining); every
    ~2 s: the model's status (desired, ready, scaling history, kept 20 deep, so polled
    often and merged)."""

    def __init__(self, stack, model):
        super().__init__(daemon=True)
        self.stack, self.model, self.stop = stack, model, threading.Event()
        self.procs, self.status, self.events = [], [], {}

    def run(self):
        n = 0
        while not self.stop.is_set() and n < 100_000:
            self.procs.append((time.perf_counter(), len(self.stack.engine_pids())))
            if n % 4 == 0:
                m = self.stack.model(self.model)
                if isinstance(m, dict):
                    a = (m.get("status") or {}).get("autoscaling") or {}
                    self.status.append((time.perf_counter(), a.get("desired_replicas"), ready_count(m)))
                    for e in a.get("history") or []:
                        self.events[(e.get("at_ms"), e.get("from"), e.get("to"))] = e.get("reason", "")
            n += 1
            self.stop.wait(0.5)


def integral(samples, t0, t1):
    """Time integral (wall seconds x count) of a step function sampled as (t, n)."""
    tot = 0.0
    pts = [(t, n) for t, n in samples if n is not None]
    for (ta, na), (tb, _) in zip(pts, pts[1:]):
        a, b = max(ta, t0), min(tb, t1)
        if b > a:
            tot += na * (b - a)
    return tot


# ---------------------------------------------------------------- manifests
def manifest(name, policy, k, static_n, target, slo_ms, max_replicas, stable_s=180, delay_s=300):
    head = (f"kind: Model\nmetadata: {{name: {name}}}\nspec:\n  engine: sim\n  source: file:///models/{name}\n"
            f"  gpus: 1\n")
    if policy == "static":
        return head + f"  replicas: {static_n}\n"
    sec = lambda s: f"{max(1, round(s / k * 1000))}ms"  # noqa: E731
    a = (f"  replicas: 1\n  autoscaling:\n    min: 1\n    max: {max_replicas}\n    strategy: {policy}\n")
    if policy == "slo":
        a += f"    slo: {{ttft_p95_ms: {slo_ms / k:g}}}\n"
    else:
        a += f"    metrics: [{{source: gateway, name: concurrency, target: {target:g}}}]\n"
    if policy != "hpa":  # defaults 180s / 60s / 300s (or the flags), divided by K
        a += f"    stable_window: {sec(stable_s)}\n    panic_window: {sec(60)}\n    scale_down_delay: {sec(delay_s)}\n"
    return head + a


def wait_ready(stack, name, n, secs):
    deadline = time.time() + secs
    while time.time() < deadline:
        m = stack.model(name)
        if ready_count(m) == n and len(stack.engine_pids()) == n:
            return True
        time.sleep(0.5)
    return False


# ---------------------------------------------------------------- commands
def summarize(recs, target_s):
    n = len(recs)
    good = sum(1 for r in recs if r["ok"] and r["ttft"] is not None and r["ttft"] <= target_s)
    ttfts = sorted(r["ttft"] for r in recs if r["ttft"] is not None)
    pct = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None  # noqa: E731
    return {"requests": n, "ok": sum(1 for r in recs if r["ok"]), "attainment": good / n if n else None,
            "ttft_p50_s": pct(0.5), "ttft_p95_s": pct(0.95), "ttft_p99_s": pct(0.99),
            "e2e_mean_s": sum(r["e2e"] for r in recs if r["ok"]) / max(1, sum(1 for r in recs if r["ok"])),
            "send_lag_p99_s": sorted(r["lag"] for r in recs)[int(0.99 * (n - 1))] if n else None}


def cmd_calibrate(a):
    os.makedirs(a.out, exist_ok=True)
    stack = Stack(a.bin, a.k, 2, a.sim_args, a.out)
    try:
        stack.cli("apply", "-f", "-", stdin=manifest("cal", "static", a.k, 1, 0, 0, 1).encode())
        if not wait_ready(stack, "cal", 1, 90):
            raise RuntimeError("calibration replica not ready")
        steps, cap, cap_conc = [], 0.0, None
        for i, rate in enumerate(a.rates):
            arr = gen_trace(a.seed + 100 + i, {"duration_s": a.step_s, "base_min": rate, "base_max": rate,
                                               "bursts": []})
            recs = asyncio.run(replay(stack.gateway, "cal", arr, a.k, a.seed + i, a.prompt_words, a.max_tokens))
            s = summarize(recs, a.ttft_target)
            s["rate"] = rate
            s["concurrency"] = rate * s["e2e_mean_s"]  # Little's law
            steps.append(s)
            print(json.dumps(s), flush=True)
            if s["attainment"] is not None and s["attainment"] >= 0.99:
                cap, cap_conc = rate, s["concurrency"]
            else:
                break
        out = {"k": a.k, "ttft_target_s": a.ttft_target, "capacity_rps": cap, "concurrency_at_capacity": cap_conc,
               "steps": steps}
        with open(os.path.join(a.out, "calibration.json"), "w") as f:
            json.dump(out, f, indent=1)
        print(json.dumps({k: v for k, v in out.items() if k != "steps"}))
    finally:
        stack.close()


def cmd_run(a):
    os.makedirs(a.out, exist_ok=True)
    cal = json.load(open(a.calibration))
    p = trace_params(a.duration, a.shape, a.seed)
    arrivals = gen_trace(a.seed, p)
    peak = max(rate_at(t / 10, p) for t in range(int(p["duration_s"] * 10)))
    static_n = math.ceil(peak / cal["capacity_rps"] - 1e-9)
    target = round(a.target_fraction * cal["concurrency_at_capacity"], 1)
    name = f"m-{a.policy}"
    stack = Stack(a.bin, a.k, a.gpus, a.sim_args, a.out)
    try:
        man = manifest(name, a.policy, a.k, static_n, target, a.ttft_target * 1000 * a.slo_fraction, a.max_replicas,
                       a.stable_window_s, a.scale_down_delay_s)
        with open(os.path.join(a.out, f"{a.policy}.yaml"), "w") as f:
            f.write(man)
        stack.cli("apply", "-f", "-", stdin=man.encode())
        n0 = static_n if a.policy == "static" else 1
        if not wait_ready(stack, name, n0, 120):
            raise RuntimeError(f"{n0} replicas not ready: {stack.model(name)}")
        sampler = Sampler(stack, name)
        sampler.start()
        t0 = time.perf_counter()
        recs = asyncio.run(replay(stack.gateway, name, arrivals, a.k, a.seed, a.prompt_words, a.max_tokens))
        t_end_trace = t0 + p["duration_s"] / a.k
        t1 = time.perf_counter()
        time.sleep(2.5)
        sampler.stop.set()
        sampler.join(10)
        final = stack.model(name)
        s = summarize(recs, a.ttft_target)
        gpu_wall = integral(sampler.procs + [(t1, None)], t0, t_end_trace)
        desired_wall = integral([(t, d) for t, d, _ in sampler.status] + [(t1, None)], t0, t_end_trace)
        events = sorted(sampler.events.items())
        t0_ms = (time.time() - (time.perf_counter() - t0)) * 1000
        in_trace = [e for e in events if e[0][0] is not None and e[0][0] >= t0_ms]
        res = {
            "policy": a.policy, "k": a.k, "seed": a.seed, "duration_s": p["duration_s"], "peak_rps": peak,
            "static_replicas": static_n, "concurrency_target": target, **s,
            "gpu_hours": gpu_wall * a.k / 3600, "gpu_hours_desired": desired_wall * a.k / 3600,
            "replay_wall_s": t1 - t0, "scaling_events": len(in_trace),
            "max_engines": max((n for _, n in sampler.procs), default=0),
            "history": [{"at_s": round((ev[0][0] - t0_ms) / 1000 * a.k, 1), "from": ev[0][1], "to": ev[0][2],
                         "reason": ev[1]} for ev in in_trace],
            "engines_timeline": [(round((t - t0) * a.k, 1), n) for t, n in sampler.procs[::4]],
            "final_status": (final or {}).get("status") if isinstance(final, dict) else None,
        }
        with open(os.path.join(a.out, f"{a.policy}.json"), "w") as f:
            json.dump(res, f, indent=1)
        with gzip.open(os.path.join(a.out, f"{a.policy}-requests.json.gz"), "wt") as f:
            json.dump(recs, f)
        print(json.dumps({k: v for k, v in res.items() if k not in ("history", "engines_timeline", "final_status")}))
    finally:
        stack.close()


def cmd_trace(a):
    p = trace_params(a.duration, a.shape, a.seed)
    arr = gen_trace(a.seed, p)
    peak = max(rate_at(t / 10, p) for t in range(int(p["duration_s"] * 10)))
    per_min = [0] * (int(p["duration_s"]) // 60 + 1)
    for t in arr:
        per_min[int(t // 60)] += 1
    print(json.dumps({"params": p, "requests": len(arr), "peak_rps": peak, "mean_rps": len(arr) / p["duration_s"],
                      "per_minute": per_min}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["calibrate", "run", "trace"])
    ap.add_argument("--bin", default=os.path.join(HERE, "../../target-asb/release/flotilla"))
    ap.add_argument("--k", type=float, default=10)
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--duration", type=float, default=1800, help="trace length, simulated seconds")
    ap.add_argument("--shape", choices=["diurnal", "spikes"], default="diurnal",
                    help="diurnal: the trace targets were chosen on; spikes: a held-out spike train")
    ap.add_argument("--policy", choices=["kpa", "apa", "slo", "hpa", "static"])
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--calibration", default=os.path.join(HERE, "out", "calibration.json"))
    ap.add_argument("--sim-args", default="--startup-seconds 60 --profile l4-llama3-8b --max-num-seqs 6")
    ap.add_argument("--gpus", type=int, default=12)
    ap.add_argument("--max-replicas", type=int, default=12)
    ap.add_argument("--ttft-target", type=float, default=1.0, help="SLO: TTFT <= this, simulated seconds")
    ap.add_argument("--slo-fraction", type=float, default=0.6, help="slo strategy's ttft_p95 = this x target")
    ap.add_argument("--target-fraction", type=float, default=0.7,
                    help="concurrency target = this x concurrency at calibrated capacity")
    ap.add_argument("--stable-window-s", type=float, default=180, help="kpa/apa/slo stable_window, simulated s")
    ap.add_argument("--scale-down-delay-s", type=float, default=300, help="kpa/apa/slo scale_down_delay, simulated s")
    ap.add_argument("--prompt-words", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25])
    ap.add_argument("--step-s", type=float, default=240, help="calibration step, simulated seconds")
    a = ap.parse_args()
    # `timeout` sends SIGTERM: leave through the `finally` that kills the stack.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    {"calibrate": cmd_calibrate, "run": cmd_run, "trace": cmd_trace}[a.cmd](a)


if __name__ == "__main__":
    main()
