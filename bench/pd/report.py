#!/usr/bin/env python3
"""Markdown tables of bench/pd results: per mix, one row per (rate, setup), times in
simulated ms and rates in simulated req/s (vllm bench serve's wall figures x / SPEEDUP),
then the goodput ratio P/D / aggregated at each rate and at each setup's best rate.

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


if __name__ == "__main__":
    main(sys.argv[1:])
