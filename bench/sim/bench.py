#!/usr/bin/env python3
"""flotilla sim benchmarks (stdlib only).

cpu      : N sims x C concurrent closed-loop requests at --speedup 1 for D seconds; reports
           the sims' CPU time (utime+stime from /proc) per generated token and their RSS.
fidelity : one a100-llama3-8b sim; TTFT and TPOT (from the sim's own vLLM histograms, in
           simulated seconds) versus concurrency and prompt length, next to published vLLM
           figures the profile was derived from.

Usage: bench.py cpu [--sims 8 --streams 64 --seconds 30 --stream]
       bench.py fidelity [--speedup 20]
The binary is $FLOTILLA_BIN (a `flotilla` binary: run as `flotilla sim`), else
$SIM_BIN (the sim crate's flotilla-sim binary: run directly).
"""
import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def sim_cmd():
    if os.environ.get("FLOTILLA_BIN"):
        return [os.environ["FLOTILLA_BIN"], "sim"]
    if os.environ.get("SIM_BIN"):
        return [os.environ["SIM_BIN"]]
    sys.exit("set FLOTILLA_BIN or SIM_BIN (bench/sim/run.sh does)")


def start_sim(extra):
    p = subprocess.Popen(sim_cmd() + ["--port", "0", "--model", "bench"] + extra,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    m = re.search(r"listening on http://([^:]+):(\d+) model=", line)
    if not m:
        p.kill()
        sys.exit(f"sim did not start: {line!r}")
    return p, int(m.group(2))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def http(port, method, path, body=None, stream=False):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode() if body is not None else b""
    w.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    await w.drain()
    if stream:
        # read until the terminating chunk without parsing events (keeps the client cheap)
        tail = b""
        while True:
            chunk = await r.read(65536)
            if not chunk:
                break
            tail = (tail + chunk)[-64:]
            if b"[DONE]" in tail:
                break
        w.close()
        return b""
    out = await r.read()
    w.close()
    return out.split(b"\r\n\r\n", 1)[1]


async def scrape(port):
    text = (await http(port, "GET", "/metrics")).decode()
    vals = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            vals[k] = float(v)
    return vals


def series(vals, name):
    return vals[f'{name}{{engine="0",model_name="bench"}}']


async def closed_loop(port, stop_at, prompt_len, max_tokens, stream, rng):
    while time.monotonic() < stop_at:
        prompt = [rng.randrange(1, 120000) for _ in range(prompt_len)]
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
        if stream:
            body["stream"] = True
        await http(port, "POST", "/v1/completions", body, stream=stream)


async def cpu_bench(a):
    procs = [start_sim(["--speedup", "1", "--max-num-seqs", str(max(a.streams, 1))]) for _ in range(a.sims)]
    try:
        rng = random.Random(1)
        warm_until = time.monotonic() + a.warmup
        end = warm_until + a.seconds
        loops = [closed_loop(port, end, a.prompt_len, a.max_tokens, a.stream, random.Random(rng.random()))
                 for _, port in procs for _ in range(a.streams)]
        runner = asyncio.gather(*loops)
        await asyncio.sleep(a.warmup)
        t0 = time.monotonic()
        cpu0 = [cpu_seconds(p.pid) for p, _ in procs]
        tok0 = [series(await scrape(port), "vllm:generation_tokens_total") for _, port in procs]
        await asyncio.sleep(a.seconds)
        cpu1 = [cpu_seconds(p.pid) for p, _ in procs]
        tok1 = [series(await scrape(port), "vllm:generation_tokens_total") for _, port in procs]
        running = [series(await scrape(port), "vllm:num_requests_running") for _, port in procs]
        t1 = time.monotonic()
        rss = [rss_mib(p.pid) for p, _ in procs]
        await runner
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait(timeout=10)
    cpu = sum(cpu1) - sum(cpu0)
    tokens = sum(tok1) - sum(tok0)
    wall = t1 - t0
    print(json.dumps({
        "sims": a.sims, "streams_per_sim": a.streams, "stream": a.stream, "seconds": round(wall, 1),
        "prompt_len": a.prompt_len, "max_tokens": a.max_tokens,
        "tokens": int(tokens), "tokens_per_s": round(tokens / wall), "sim_cpu_s": round(cpu, 2),
        "sim_cpu_cores": round(cpu / wall, 3), "us_per_token": round(cpu / tokens * 1e6, 2) if tokens else None,
        "rss_mib_each": [round(r, 1) for r in rss], "rss_mib_total": round(sum(rss), 1),
        "running_at_end": running,
    }))


async def measure(port, conc, prompt_len, out_len, rounds, speedup):
    before = await scrape(port)
    t0 = time.monotonic()
    rng = random.Random(conc * 7919 + prompt_len)

    async def one_stream():
        for _ in range(rounds):
            prompt = [rng.randrange(1, 120000) for _ in range(prompt_len)]
            await http(port, "POST", "/v1/completions",
                       {"model": "bench", "prompt": prompt, "max_tokens": out_len, "ignore_eos": True})

    await asyncio.gather(*[one_stream() for _ in range(conc)])
    wall = time.monotonic() - t0
    after = await scrape(port)

    def mean(h):
        c = series(after, h + "_count") - series(before, h + "_count")
        return (series(after, h + "_sum") - series(before, h + "_sum")) / c

    toks = series(after, "vllm:generation_tokens_total") - series(before, "vllm:generation_tokens_total")
    return {"concurrency": conc, "prompt_len": prompt_len, "output_len": out_len,
            "ttft_ms": round(mean("vllm:time_to_first_token_seconds") * 1e3, 1),
            "tpot_ms": round(mean("vllm:request_time_per_output_token_seconds") * 1e3, 2),
            "out_tok_per_s": round(toks / (wall * speedup))}


async def fidelity(a):
    p, port = start_sim(["--profile", "a100-llama3-8b", "--speedup", str(a.speedup), "--max-model-len", "4096"])
    rows = []
    try:
        for prompt_len in (128, 1024, 2048):
            for conc in (1, 2, 4, 8, 16, 32, 64):
                rows.append(await measure(port, conc, prompt_len, 128, a.rounds, a.speedup))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        p.terminate()
        p.wait(timeout=10)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--sims", type=int, default=8)
    c.add_argument("--streams", type=int, default=64)
    c.add_argument("--seconds", type=float, default=30)
    c.add_argument("--warmup", type=float, default=5)
    c.add_argument("--prompt-len", type=int, default=256)
    c.add_argument("--max-tokens", type=int, default=128)
    c.add_argument("--stream", action="store_true", help="stream tokens as server-sent events")
    f = sub.add_parser("fidelity")
    f.add_argument("--speedup", type=float, default=20)
    f.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    asyncio.run(cpu_bench(a) if a.cmd == "cpu" else fidelity(a))


if __name__ == "__main__":
    main()
