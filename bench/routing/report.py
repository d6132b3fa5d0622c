#!/usr/bin/env python3
"""Markdown table of bench/routing results: one row per (load, target), the median over
runs of each figure (with the runs' range for TTFT p99 when there are several).

Usage: python3 bench/routing/report.py bench/routing/out/run-*.jsonl
"""
import json
import statistics
import sys
from collections import defaultdict


def fmt(v, unit="", digits=0):
    return "-" if v is None else f"{v:,.{digits}f}{unit}"


def main(paths):
    points = defaultdict(list)
    oracle = {}
    for p in paths:
        for line in open(p):
            line = line.strip()
            if not line.startswith("{"):
                continue
            d = json.loads(line)
            points[(float(d.get("rate", 0)), d.get("target", d.get("label")))].append(d)
            if d.get("oracle_hit_rate") is not None:
                oracle[(float(d.get("rate", 0)), d.get("run"))] = d["oracle_hit_rate"]
    print("| load req/s | target | runs | ok | failed | req/s | out tok/s | TTFT p50 | TTFT p99 (range) | ITL p99 | engine hit rate | oracle hit rate (computed) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (rate, target), runs in sorted(points.items()):
        good = [r for r in runs if "error" not in r]
        if not good:
            print(f"| {rate:g} | {target} | {len(runs)} | - | - | - | - | - | - | - | - | - |  ({runs[0]['error']})")
            continue

        def med(k):
            vals = [r[k] for r in good if r.get(k) is not None]
            return statistics.median(vals) if vals else None

        p99 = [r["ttft_p99_ms"] for r in good if r.get("ttft_p99_ms") is not None]
        rng = f" ({min(p99):,.0f}-{max(p99):,.0f})" if len(p99) > 1 else ""
        hit, orc = med("engine_hit_rate"), med("oracle_hit_rate")
        print(
            f"| {rate:g} | {target} | {len(good)} | {sum(r['ok'] for r in good)} | {sum(r['failed'] for r in good)} "
            f"| {fmt(med('req_per_s'), '', 1)} | {fmt(med('output_tok_per_s'))} | {fmt(med('ttft_p50_ms'), ' ms')} "
            f"| {fmt(med('ttft_p99_ms'), ' ms')}{rng} | {fmt(med('itl_p99_ms'), ' ms', 1)} "
            f"| {fmt(None if hit is None else 100 * hit, '%', 1)} | {fmt(None if orc is None else 100 * orc, '%', 1)} |"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
