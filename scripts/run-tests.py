#!/usr/bin/env python3
"""Runs the workspace's test binaries several at a time (scripts/test calls it).

`cargo test` runs its test binaries one after another. Most of ours start servers, agents
and engines and then wait on them: measured on the 2-core VM, an end-to-end binary keeps
the CPUs ~15-20% busy. So this builds every test binary with cargo (`--no-run`), runs
`--jobs` of them at once (default 3), each as cargo would (its package's directory as the
working directory, CARGO_MANIFEST_DIR and CARGO_PKG_NAME set), and prints each one's output
whole when it ends, so logs do not interleave. Binaries named in EXCLUSIVE run alone after
the others (the real-vLLM tier: CPU inference takes both cores, and its timeouts assume
it). Then the doc tests run through cargo.

    scripts/run-tests.py [--jobs N] [--timeout S] [CARGO_ARGS...] [-- TEST_ARGS...]

CARGO_ARGS select what to build (`-p flotilla-gateway`, `--test pd`); TEST_ARGS go to
every binary (a name filter, `--nocapture`, `--test-threads 1`). Every binary runs even
after a failure; the exit code is 1 when any failed or timed out. The last lines are a
table of binaries by wall time with their CPU time, and the failures.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

# Test binaries (cargo target names) that must not share the machine with other tests.
EXCLUSIVE = {"real_vllm"}
# Started first, being the longest (seconds on the 2-core VM): the pool ends no sooner than
# its longest binary, so a long one started last would run alone at the end. Only an order:
# a stale entry costs nothing.
LONGEST = ["chaos_scenarios", "gang", "rollout_e2e", "fleet_e2e"]  # 205, 65, 52, 33 s


def build(cargo_args):
    """Builds the test binaries; returns [(name, kind, package, manifest dir, executable)]."""
    cmd = ["cargo", "test", "--no-run", "--message-format=json-render-diagnostics", *cargo_args]
    print("run-tests: " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    found = []
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        if not msg.get("profile", {}).get("test"):
            continue
        target = msg["target"]
        manifest_dir = os.path.dirname(msg["manifest_path"])
        package = msg["package_id"]
        # package_id: "path+file:///work/main/cli#flotilla@0.1.0" or "name 0.1.0 (path+...)"
        name = package.split("#")[-1].split("@")[0] if "#" in package else package.split()[0]
        found.append((target["name"], target["kind"][0], name, manifest_dir, msg["executable"]))
    return found


class Result:
    def __init__(self, binary, code, wall, cpu, output, timed_out):
        self.binary, self.code, self.wall, self.cpu = binary, code, wall, cpu
        self.output, self.timed_out = output, timed_out

    @property
    def label(self):
        name, kind, package = self.binary[:3]
        return f"{package} {kind} {name}"


def run_one(binary, test_args, timeout):
    name, kind, package, manifest_dir, exe = binary
    env = dict(os.environ, CARGO_MANIFEST_DIR=manifest_dir, CARGO_PKG_NAME=package)
    with tempfile.TemporaryFile() as out:
        start = time.monotonic()
        proc = subprocess.Popen(
            [exe, *test_args], cwd=manifest_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        with LIVE_LOCK:
            LIVE.add(proc.pid)
        timer = threading.Timer(timeout, lambda: kill_group(proc.pid))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        timed_out = time.monotonic() - start >= timeout
        # the binary's own process group: servers it started and did not stop go too
        kill_group(proc.pid)
        with LIVE_LOCK:
            LIVE.discard(proc.pid)
        wall = time.monotonic() - start
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    code = os.waitstatus_to_exitcode(status)
    return Result(binary, code, wall, usage.ru_utime + usage.ru_stime, text, timed_out)


LIVE = set()
LIVE_LOCK = threading.Lock()


def kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def report(r, lock):
    with lock:
        state = "TIMED OUT" if r.timed_out else ("ok" if r.code == 0 else f"FAILED (exit {r.code})")
        print(f"\n===== {r.label}: {state} in {r.wall:.1f} s (CPU {r.cpu:.1f} s) =====", flush=True)
        sys.stdout.write(r.output)
        sys.stdout.flush()


def run_pool(binaries, jobs, test_args, timeout):
    results, lock, queue = [], threading.Lock(), list(binaries)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                b = queue.pop(0)
            r = run_one(b, test_args, timeout)
            report(r, lock)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--jobs", type=int, default=int(os.environ.get("FLOTILLA_TEST_JOBS", "3")),
                   help="test binaries run at once (FLOTILLA_TEST_JOBS, default 3)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one binary may run (default 1800)")
    args, rest = p.parse_known_args()
    if "--" in rest:
        i = rest.index("--")
        cargo_args, test_args = rest[:i], rest[i + 1:]
    else:
        cargo_args, test_args = rest, []
    # cargo's own run flags mean nothing here: every binary always runs
    cargo_args = [a for a in cargo_args if a not in ("--no-fail-fast",)]

    def interrupted(signum, _frame):
        with LIVE_LOCK:
            for pid in list(LIVE):
                kill_group(pid)
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)

    binaries = build(cargo_args)
    # the longest first, then integration tests, so the short unit tests fill in at the end
    def order(b):
        return (LONGEST.index(b[0]) if b[0] in LONGEST and b[1] == "test" else len(LONGEST), b[1] != "test")

    shared = sorted((b for b in binaries if b[0] not in EXCLUSIVE), key=order)
    alone = [b for b in binaries if b[0] in EXCLUSIVE]
    print(f"run-tests: {len(shared)} test binaries, {args.jobs} at a time, then {len(alone)} alone", flush=True)
    start = time.monotonic()
    results = run_pool(shared, args.jobs, test_args, args.timeout)
    results += run_pool(alone, 1, test_args, args.timeout)
    tests_wall = time.monotonic() - start

    # doc tests: cargo compiles and runs them itself
    doc = ["cargo", "test", "--doc", *[a for a in cargo_args if a not in ("--tests", "--lib", "--bins")], "--", *test_args]
    doc_ok = True
    if not any(a in ("--test", "--lib", "--bins", "--tests", "--bin") for a in cargo_args):
        print("\nrun-tests: " + " ".join(doc), flush=True)
        doc_ok = subprocess.run(doc).returncode == 0

    failed = [r for r in results if r.code != 0 or r.timed_out]
    print(f"\nrun-tests: {len(results)} binaries in {tests_wall:.0f} s; slowest (wall s, CPU s):")
    for r in sorted(results, key=lambda r: -r.wall)[:15]:
        print(f"  {r.wall:7.1f} {r.cpu:7.1f}  {r.label}")
    if not doc_ok:
        print("run-tests: the doc tests FAILED")
    for r in failed:
        print(f"run-tests: FAILED {r.label}" + (" (timed out)" if r.timed_out else f" (exit {r.code})"))
    sys.exit(1 if failed or not doc_ok else 0)


if __name__ == "__main__":
    main()
