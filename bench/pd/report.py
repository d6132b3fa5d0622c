#!/usr/bin/env python3
"""Markdown tables of bench/pd results: per mix, one row per (rate, setup), times in
simulated ms and rates in simulated req/s (vllm bench serve's wall figures x / SPEEDUP),
then the goodput ratio P/D / aggregated at each rate and at each setup's best rate, then
(for points with per-request data) the best goodput of each setup at other TPOT SLOs,
computed from the same requests.

Usage: python3 bench/pd/report.py bench/pd/out/*.jsonl
"""
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from point import expected  # noqa: E402


def sim_prompt_mean(d):
    """Mean prompt tokens the sims counted a request: decode engines for P/D (they count
    every request's whole prompt, pulled or computed; prefill engines see only the remote
    splits), every engine when aggregated; only the point's own engines (older lines may
    carry an earlier setup's stale scrapes)."""
    want = expected(d["setup"])
    es = [e for e in d.get("engines", []) if (e["engine"], e["role"]) in want]
    if any(e["role"] == "d" for e in es):
        es = [e for e in es if e["role"] == "d"]
    n = sum(e["requests"] for e in es)
    return sum(e["prompt_tokens"] for e in es) / n if n else None


def fmt(v, digits=0):
    return "-" if v is None else f"{v:,.{digits}f}"


def main(paths):
    mixes = defaultdict(dict)
    for p in paths:
        for line in open(p):
            if line.startswith("{"):
                d = json.loads(line)
                mixes[(d["mix"], d["seed"])][(float(d["rate"]), d["setup"])] = d  # last wins
    for (mix, seed), points in sorted(mixes.items()):
        print(f"\n### {mix} mix, seed {seed}\n")
        print("| rate req/s | setup | done/sent | sim prompt tok | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | goodput req/s | in SLO | load 1m before→after |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        best = defaultdict(lambda: (0.0, None))
        slo90 = defaultdict(float)  # DistServe's goodput: the highest rate with >= 90% in SLO
        by_rate = defaultdict(dict)
        for (rate, setup), d in sorted(points.items()):
            s = float(d["speedup"])
            t = lambda k: None if d.get(k) is None else d[k] * s  # wall ms -> simulated ms
            good = (d.get("request_goodput") or 0.0) / s
            thr = d["request_throughput"] / s
            by_rate[rate][setup] = good
            if thr and good / thr >= 0.9:
                slo90[setup] = max(slo90[setup], rate)
            if good > best[setup][0]:
                best[setup] = (good, rate)
            sent = d.get("num_prompts") or d["completed"] + d.get("failed", 0)
            print(
                f"| {rate:g} | {setup} | {d['completed']}/{sent} | {fmt(sim_prompt_mean(d))} "
                f"| {thr:.2f} | {fmt(d['output_throughput'] / s)} | {fmt(t('p50_ttft_ms'))} ms | {fmt(t('p99_ttft_ms'))} ms "
                f"| {fmt(t('p50_tpot_ms'), 1)} ms | {fmt(t('p99_tpot_ms'), 1)} ms | **{good:.2f}** "
                f"| {100 * good / thr if thr else 0:.0f}% | {d['load_before'].split()[0]}→{d['load_after'].split()[0]} |"
            )
        setups = sorted({s for (_, s) in points})
        pds = [s for s in setups if s.startswith("pd")]
        aggs = [s for s in setups if s.startswith("agg")]
        print()
        for a in aggs:
            for p in pds:
                ratios = [f"{r:g}: {g[p] / g[a]:.2f}" if g.get(a) else f"{r:g}: -" for r, g in sorted(by_rate.items()) if p in g and a in g]
                bp, ba = best[p], best[a]
                peak = f"{bp[0] / ba[0]:.2f}" if ba[0] else "-"
                print(f"- goodput {p} / {a} by rate: {', '.join(ratios)}; best rate each: "
                      f"{bp[0]:.2f} (at {bp[1]}) / {ba[0]:.2f} (at {ba[1]}) = **{peak}x**; highest rate tried with "
                      f">= 90% in SLO: {slo90[p]:g} / {slo90[a]:g}")
        slo_table(points, setups)


TPOT_SLOS_MS = (20, 30, 50)


def slo_table(points, setups):
    """Best goodput over the rates tried, per setup, at TTFT <= the run's SLO and each TPOT
    SLO, from the points' per-request TTFT/TPOT (simulated ms)."""
    detailed = {k: d for k, d in points.items() if d.get("requests") is not None}
    if not detailed:
        return
    print("\nBest goodput over the rates tried at other TPOT SLOs, computed from the same requests "
          "(req/s, at the rate in parentheses):\n")
    print("| TTFT / TPOT SLO | " + " | ".join(setups) + " | ratios |")
    print("| --- | " + " | ".join("---:" for _ in setups) + " | --- |")
    ttft_slo = next(iter(detailed.values()))["ttft_slo_ms"]
    for tpot_slo in TPOT_SLOS_MS:
        best = {}
        for (rate, setup), d in detailed.items():
            s = float(d["speedup"])
            good = sum(1 for t, p in d["requests"] if t <= ttft_slo and p <= tpot_slo) / (d["duration"] / s)
            if good > best.get(setup, (0.0, None))[0]:
                best[setup] = (good, rate)
        cells = [f"{best[x][0]:.2f} ({best[x][1]:g})" if x in best else "-" for x in setups]
        aggs = [x for x in setups if x.startswith("agg") and best.get(x, (0,))[0]]
        ratios = [f"{p}/{a} {best[p][0] / best[a][0]:.2f}x" for a in aggs for p in setups if p.startswith("pd") and p in best]
        print(f"| ≤ {ttft_slo:g} ms / ≤ {tpot_slo} ms | " + " | ".join(cells) + f" | {', '.join(ratios)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
