#!/usr/bin/env python3
"""Prints the results table (markdown) from bench/autoscaler/out/*.json, then one row per
variant directory (out/VARIANT/POLICY.json: the same trace with other knobs)."""
import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
rows = {}
for p in ("static", "kpa", "apa", "slo", "hpa"):
    f = os.path.join(out, f"{p}.json")
    if os.path.exists(f):
        rows[p] = json.load(open(f))
for d in sorted(os.listdir(out)):
    for p in ("kpa", "apa", "slo", "hpa"):
        f = os.path.join(out, d, f"{p}.json")
        if os.path.isdir(os.path.join(out, d)) and os.path.exists(f):
            rows[d] = json.load(open(f))
static = rows.get("static", {}).get("gpu_hours")
hpa = rows.get("hpa", {}).get("scaling_events")
print("| policy | requests | SLO attainment (TTFT ≤ 1 s) | failed / slow | TTFT p50 / p95 / p99 (s) | GPU-hours | "
      "vs static | scaling events | max replicas | goal met |")
print("|---|---|---|---|---|---|---|---|---|---|")
for p, r in rows.items():
    ratio = r["gpu_hours"] / static if static else None
    goal = "—"
    if p != "static" and ratio is not None:
        ok = [r["attainment"] >= 0.99, ratio <= 0.60]
        if p != "hpa" and hpa is not None:
            ok.append(r["scaling_events"] < hpa)
        goal = "yes" if all(ok) else "no"
    # failed = no 200 or a stream cut before [DONE]; slow = completed with TTFT over target.
    met = round(r["attainment"] * r["requests"])
    print(f"| {p} | {r['requests']} ({r['ok']} ok) | {100 * r['attainment']:.2f}% | "
          f"{r['requests'] - r['ok']} / {r['ok'] - met} | "
          f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['gpu_hours']:.2f} | "
          f"{'' if ratio is None else f'{100 * ratio:.0f}%'} | {r['scaling_events']} | {r['max_engines']} | {goal} |")
