#!/usr/bin/env python3
"""Failover under load through the global gateway (stdlib only).

THREADS closed-loop clients send non-streamed chat completions over keep-alive connections
for DURATION s; at KILL_AT s the process PID (the preferred member's sim) gets SIGKILL. Every
request's start, end, status and answering cluster (x-flotilla-cluster) is recorded; prints
one JSON line: requests, failed (anything but 200, connection errors included: the goal is
0), the requests in flight at the kill and the longest wait among them after it, the time
from the kill until a request sent after it was answered by another cluster, and latency
percentiles before and after.
"""
import http.client
import json
import os
import signal
import sys
import threading
import time

addr, pid = sys.argv[1], int(sys.argv[2])
THREADS = int(os.environ.get("THREADS", "8"))
DURATION = float(os.environ.get("DURATION", "8"))
KILL_AT = float(os.environ.get("KILL_AT", "3"))
host, port = addr.rsplit(":", 1)
body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
records = []
lock = threading.Lock()
t0 = time.monotonic()
stop = t0 + DURATION


def client():
    conn = None
    mine = []
    while time.monotonic() < stop:
        start = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("POST", "/v1/chat/completions", body, headers)
            r = conn.getresponse()
            r.read()
            rec = (start, time.monotonic(), r.status, r.getheader("x-flotilla-cluster", ""))
        except Exception as e:  # a client-visible failure
            conn = None
            rec = (start, time.monotonic(), 0, type(e).__name__)
        mine.append(rec)
    with lock:
        records.extend(mine)


threads = [threading.Thread(target=client) for _ in range(THREADS)]
for t in threads:
    t.start()
time.sleep(KILL_AT)
kill = time.monotonic()
os.kill(pid, signal.SIGKILL)
for t in threads:
    t.join()

def pct(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1e3, 2) if xs else None

killed_cluster = max(
    {c for s, e, st, c in records if e < kill and st == 200},
    key=lambda c: sum(1 for s, e, st, cc in records if cc == c and e < kill),
)
failed = [r for r in records if r[2] != 200]
in_flight = [r for r in records if r[0] < kill < r[1]]
after = sorted(r for r in records if r[0] >= kill and r[2] == 200 and r[3] != killed_cluster)
print(json.dumps({
    "threads": THREADS, "duration_s": DURATION, "kill_at_s": KILL_AT,
    "requests": len(records), "failed": len(failed),
    "failures": sorted({f"{r[2]} {r[3]}" for r in failed}),
    "killed_cluster": killed_cluster,
    "served_before_kill": {c: sum(1 for s, e, st, cc in records if cc == c and e < kill) for c in {r[3] for r in records}},
    "in_flight_at_kill": len(in_flight),
    "in_flight_all_ok": all(r[2] == 200 for r in in_flight),
    "in_flight_max_wait_after_kill_ms": round(max((r[1] - kill for r in in_flight), default=0) * 1e3, 2),
    "first_answer_by_other_cluster_after_kill_ms": round((after[0][1] - kill) * 1e3, 2) if after else None,
    "latency_before_kill_ms": {"p50": pct([e - s for s, e, st, c in records if e < kill], 50),
                               "p99": pct([e - s for s, e, st, c in records if e < kill], 99)},
    "latency_first_second_after_kill_ms": {"p50": pct([e - s for s, e, st, c in records if kill <= s < kill + 1], 50),
                                           "p99": pct([e - s for s, e, st, c in records if kill <= s < kill + 1], 99),
                                           "max": pct([e - s for s, e, st, c in records if kill <= s < kill + 1], 100)},
}))
