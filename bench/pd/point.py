#!/usr/bin/env python3
"""One JSON line per bench/pd point: vllm bench serve's saved result (its scalar fields) plus
the deltas of the engines' and the gateway's counters over the point (run.sh scrapes
`before-*.prom` and `after-*.prom` into the work dir), and each completed request's TTFT and
TPOT in simulated ms (`requests`, from `--save-detailed`), so goodput can be computed at any
SLO from the same run (report.py's SLO table).

Usage (from run.sh): point.py point WORK RESULT.json EXTRA_JSON | point.py calibrate WORK INPUT_LEN
"""
import glob
import json
import os
import re
import sys
from collections import defaultdict

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN|\+Inf)')
SIM_COUNTERS = {
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:request_success_total": "requests",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:nixl_num_failed_transfers_total": "failed_transfers",
    "vllm:prefix_cache_hits_total": "prefix_hits",
}


def parse(path):
    """{(name, labels): value} of a Prometheus text file (missing file: empty)."""
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path):
        m = LINE.match(line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def summed(d, name):
    return sum(v for (n, _), v in d.items() if n == name)


def sims(work):
    """[{engine, role, counters...}] with the deltas of SIM_COUNTERS."""
    rows = []
    for after in sorted(glob.glob(os.path.join(work, "after-sim*.prom"))):
        tag = os.path.basename(after)[len("after-"):-len(".prom")]  # sim3-d
        a, b = parse(after), parse(os.path.join(work, f"before-{tag}.prom"))
        row = {"engine": tag.split("-")[0], "role": tag.split("-")[1]}
        for name, key in SIM_COUNTERS.items():
            row[key] = summed(a, name) - summed(b, name)
        rows.append(row)
    return rows


def gateway(work):
    a, b = parse(os.path.join(work, "after-gw.prom")), parse(os.path.join(work, "before-gw.prom"))
    splits = defaultdict(float)
    for (n, labels), v in a.items():
        if n.endswith("pd_requests_total"):
            m = re.search(r'split="([^"]+)"', labels)
            splits[m.group(1) if m else "?"] += v - b.get((n, labels), 0.0)
    return {k: v for k, v in splits.items() if v}


def expected(setup):
    """The engines of a setup as run.sh starts them: pd:P:D -> sim1..P prefill ("p"), then D
    decode ("d"); agg:N -> sim1..N ("a")."""
    if setup.startswith("pd:"):
        np_, nd = (int(x) for x in setup[3:].split(":"))
        roles = ["p"] * np_ + ["d"] * nd
    else:
        roles = ["a"] * int(setup.split(":")[1])
    return {(f"sim{i + 1}", r) for i, r in enumerate(roles)}


def point(work, result_path, extra):
    res = json.load(open(result_path))
    d = json.loads(extra)
    d.update({k: v for k, v in res.items() if isinstance(v, (int, float, str)) or v is None})
    # Only this point's engines (a work dir may still hold an earlier setup's scrapes).
    want = expected(d["setup"])
    engines = [e for e in sims(work) if (e["engine"], e["role"]) in want]
    d["engines"] = engines
    d["pd_splits"] = gateway(work)
    # The prompt length the sims really saw: prefill engines for P/D (the decode engine of a
    # remote split counts the prompt too), all engines when aggregated.
    role = "p" if any(e["role"] == "p" for e in engines) else None
    seen = [e for e in engines if role is None or e["role"] == role]
    reqs = sum(e["requests"] for e in seen)
    d["sim_prompt_tokens_mean"] = sum(e["prompt_tokens"] for e in seen) / reqs if reqs else None
    d["requests"] = per_request(res, float(d["speedup"]))
    print(json.dumps(d))


def per_request(res, speedup):
    """[[ttft_ms, tpot_ms], ...] of the completed requests in simulated ms, as vllm bench serve
    computes them (TPOT: (latency - TTFT) / (output tokens - 1), 0 for one token); None when
    the result has no per-request detail."""
    ttfts, lats, outs, errs = (res.get(k) for k in ("ttfts", "latencies", "output_lens", "errors"))
    if not (ttfts and lats and outs):
        return None
    rows = []
    for i, (ttft, lat, n) in enumerate(zip(ttfts, lats, outs)):
        if (errs and errs[i]) or not n:
            continue
        tpot = (lat - ttft) / (n - 1) if n > 1 else 0.0
        rows.append([round(ttft * 1e3 * speedup, 1), round(tpot * 1e3 * speedup, 2)])
    return rows


def calibrate(work, input_len):
    e = sims(work)[0]
    per = e["prompt_tokens"] / e["requests"]
    print(f"--random-input-len {input_len}: the sim counted {per:.1f} prompt tokens a request "
          f"({e['requests']:.0f} requests); ratio {per / float(input_len):.4f}")


if __name__ == "__main__":
    if sys.argv[1] == "point":
        point(*sys.argv[2:5])
    else:
        calibrate(*sys.argv[2:4])
