#!/usr/bin/env python3
"""Replica lifecycle benchmark (issue 19), driving the shipped `flotilla` binary.

heal     A node stops heartbeating (SIGSTOP of its agent; its engines keep running, as in a
         network cut): time until the model is back at its full Ready count on the other
         node, TRIALS times; then SIGCONT and wait for the surplus to be drained.
rolling  REPLICAS sim replicas across NODES agents (GPUS each), engines that take START_S to
         start; under streaming load through a gateway, an engine argument changes: time
         until every replica runs the new template and is Ready, and failed requests.

Everything runs on loopback in a temp dir and is killed at the end. Prints one JSON object.
Standard library only.
"""
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

FLOTILLA = os.environ["FLOTILLA"]
# Every engine this run starts carries `--seed MARKER` (engines outlive a killed agent).
MARKER = str(1_000_000 + os.getpid())


def log(msg):
    print(f"[lifecycle {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, log_path, **kw):
    p = subprocess.Popen(args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, **kw)
    PIDS_TO_KILL.append(p)
    return p


PIDS_TO_KILL = []


def cli(servers, *args, stdin=None):
    out = subprocess.run([FLOTILLA, "--server", servers, *args], input=stdin, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"flotilla {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def start_servers(work):
    os.makedirs(work, exist_ok=True)
    ports = [free_port() for _ in range(6)]
    servers = ",".join(f"127.0.0.1:{p}" for p in ports[:3])
    for i in range(3):
        join = ["--bootstrap"] if i == 0 else ["--join", f"127.0.0.1:{ports[0]}"]
        spawn([FLOTILLA, "server", "--id", str(i + 1), "--data-dir", f"{work}/s{i + 1}",
               "--grpc-addr", f"127.0.0.1:{ports[i]}", "--http-addr", f"127.0.0.1:{ports[i + 3]}", *join],
              f"{work}/s{i + 1}.log")
        time.sleep(1.0 if i == 0 else 0.3)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            st = json.loads(cli(servers, "-o", "json", "cluster", "status"))
            voters = [m for m in st.get("members", []) if m.get("voter", True)]
            if st.get("leader_id") and len(voters) >= 3:
                return servers
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError("the servers never formed a 3-voter cluster")


def start_agents(work, servers, n, gpus, sim_args, prefix):
    agents = {}
    for i in range(n):
        name = f"{prefix}{i + 1}"
        agents[name] = spawn([FLOTILLA, "agent", "--server", servers, "--node-name", name, "--gpus", str(gpus),
                              "--gpu-type", "A100-80GB", "--data-dir", f"{work}/{name}", f"--sim-args={sim_args} --seed {MARKER}"],
                             f"{work}/{name}.log", env={**os.environ, "RUST_LOG": "warn"})
    return agents


def start_gateway(work, servers):
    p = subprocess.Popen([FLOTILLA, "--server", servers, "gateway", "--listen", "127.0.0.1:0", "--no-auth"],
                         stdout=subprocess.PIPE, stderr=open(f"{work}/gateway.log", "w"), text=True,
                         env={**os.environ, "RUST_LOG": "warn"})
    PIDS_TO_KILL.append(p)
    line = p.stdout.readline()
    return line.split("http://")[1].strip()


def replicas(servers, model):
    objs = json.loads(cli(servers, "-o", "json", "get", "replicas", "-l", f"model={model}"))
    if isinstance(objs, dict):
        objs = [objs]
    return objs


def phase(o):
    return (o.get("status") or {}).get("phase", "Pending")


def apply(servers, manifest):
    cli(servers, "apply", "-f", "-", stdin=manifest)


def model_manifest(name, replicas, args=(), labels=""):
    args_yaml = ", ".join(f"'{a}'" for a in args)
    return (f"kind: Model\nmetadata:\n  name: {name}\n{labels}spec:\n  engine: sim\n"
            f"  source: file:///models/{name}\n  replicas: {replicas}\n  gpus: 1\n  engine_args: [{args_yaml}]\n")


def wait(what, pred, limit):
    t0 = time.time()
    while time.time() - t0 < limit:
        if pred():
            return time.time() - t0
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {limit} s waiting for {what}")


class Load:
    """Streaming chat requests through the gateway on CLIENTS threads until stopped."""

    def __init__(self, gateway, model, clients):
        self.ok, self.failed, self.samples, self.stop = 0, 0, [], False
        self.lock = threading.Lock()
        host, port = gateway.split(":")
        body = json.dumps({"model": model, "stream": True, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "hello there"}]})

        def run():
            deadline = time.time() + 3600
            while not self.stop and time.time() < deadline:
                try:
                    c = http.client.HTTPConnection(host, int(port), timeout=120)
                    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                    r = c.getresponse()
                    text = r.read().decode("utf-8", "replace")
                    good = r.status == 200 and "data: [DONE]" in text and '"error"' not in text
                    c.close()
                except Exception as e:  # noqa: BLE001
                    good, text = False, str(e)
                with self.lock:
                    if good:
                        self.ok += 1
                    else:
                        self.failed += 1
                        if len(self.samples) < 5:
                            self.samples.append(text[:300])

        self.threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop = True
        for t in self.threads:
            t.join(timeout=150)
        return {"ok": self.ok, "failed": self.failed, "failure_samples": self.samples}


def heal(work, trials):
    servers = start_servers(f"{work}/heal")
    agents = start_agents(f"{work}/heal", servers, 2, 2, "--speedup 50", "h")
    apply(servers, model_manifest("heal", 2, labels="  labels: {flotilla.io/placement: spread}\n"))
    wait("2 ready", lambda: sum(phase(o) == "Ready" for o in replicas(servers, "heal")) == 2, 120)
    times = []
    for t in range(trials):
        objs = replicas(servers, "heal")
        victim = objs[0]["spec"]["node"]
        other = next(n for n in agents if n != victim)
        agents[victim].send_signal(signal.SIGSTOP)
        t0 = time.time()
        wait("2 ready on the other node", lambda: sum(
            phase(o) == "Ready" and o["spec"].get("node") == other for o in replicas(servers, "heal")) == 2, 120)
        took = time.time() - t0
        times.append(took)
        log(f"heal trial {t + 1}: {took:.2f} s")
        agents[victim].send_signal(signal.SIGCONT)
        wait("back to 2 replicas", lambda: (lambda r: len(r) == 2 and all(phase(o) == "Ready" for o in r))(
            replicas(servers, "heal")), 120)
        time.sleep(2)
    return {"trials": trials, "heal_s": [round(x, 2) for x in times], "p50_s": round(statistics.median(times), 2),
            "max_s": round(max(times), 2)}


def rolling(work, nodes, gpus, count, start_s, clients):
    servers = start_servers(f"{work}/roll")
    start_agents(f"{work}/roll", servers, nodes, gpus, f"--speedup 1 --startup-seconds {start_s}", "n")
    apply(servers, model_manifest("roll", count))
    ready = lambda: sum(phase(o) == "Ready" for o in replicas(servers, "roll"))  # noqa: E731
    took = wait(f"{count} ready", lambda: ready() == count, 600 + 3 * start_s)
    log(f"{count} replicas ready in {took:.1f} s")
    gateway = start_gateway(f"{work}/roll", servers)
    time.sleep(3)
    load = Load(gateway, "roll", clients)
    time.sleep(5)
    apply(servers, model_manifest("roll", count, args=("--max-num-seqs", "128")))
    t0 = time.time()
    min_ready = count

    def done():
        nonlocal min_ready
        r = replicas(servers, "roll")
        min_ready = min(min_ready, sum(phase(o) == "Ready" for o in r))
        new = [o for o in r if o["spec"].get("engine_args") == ["--max-num-seqs", "128"]]
        return len(r) == count and len(new) == count and all(phase(o) == "Ready" for o in r)

    took = wait("the rollout", done, 3600)
    time.sleep(2)
    result = load.finish()
    return {"nodes": nodes, "gpus_per_node": gpus, "replicas": count, "engine_start_s": start_s,
            "rollout_s": round(took, 1), "min_ready_during": min_ready, "load": result}


def main():
    which = sys.argv[1:] or ["heal", "rolling"]
    out = {}
    with tempfile.TemporaryDirectory(prefix="flotilla-lifecycle-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as work:
        try:
            if "heal" in which:
                out["heal"] = heal(work, int(os.environ.get("TRIALS", "10")))
            for p in PIDS_TO_KILL:
                p.kill()
            PIDS_TO_KILL.clear()
            subprocess.run(["pkill", "-9", "-f", "--", f"--seed {MARKER}"], check=False)
            if "rolling" in which:
                out["rolling"] = rolling(work, int(os.environ.get("NODES", "50")), int(os.environ.get("GPUS", "3")),
                                         int(os.environ.get("REPLICAS", "100")), int(os.environ.get("START_S", "60")),
                                         int(os.environ.get("CLIENTS", "8")))
        finally:
            for p in PIDS_TO_KILL:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                except Exception:  # noqa: BLE001
                    pass
            subprocess.run(["pkill", "-9", "-f", "--", f"--seed {MARKER}"], check=False)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
