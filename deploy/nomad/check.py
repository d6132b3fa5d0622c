#!/usr/bin/env python3
"""Checks the Nomad job specs against the flotilla binary: each file parses as HCL2
(python-hcl2), each task runs /usr/local/bin/flotilla ROLE --config <its template>, and
that config (its Go-template expressions replaced by placeholders of the right shape) uses only keys the
binary knows: `flotilla ROLE --config FILE --help` exits 0.

Usage: check.py FLOTILLA_BINARY JOB.nomad.hcl... ; prints one line per task, exits 1 on
the first problem."""
import re
import subprocess
import sys
import tempfile
import textwrap

import hcl2


def unquote(v):
    return v[1:-1] if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"' else v


def heredoc(v):
    v = unquote(v)
    m = re.match(r"<<-?(\w+)\n(.*)\n\s*\1$", v, re.S)
    return textwrap.dedent(m.group(2)) if m else v


def placeholder(m):
    """A value of the right shape for a Go-template expression (clap checks shapes)."""
    expr = m.group(0)
    if "NOMAD_ADDR_" in expr or "nomadService" in expr:
        return "127.0.0.1:7070"
    if "ip-address" in expr:
        return "127.0.0.1"
    return "placeholder"


def tasks(node):
    """(task name, task body) for every task block under node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "task":
                for block in value:
                    for name, body in block.items():
                        yield unquote(name), body
            else:
                yield from tasks(value)
    elif isinstance(node, list):
        for item in node:
            yield from tasks(item)


def main():
    binary, files = sys.argv[1], sys.argv[2:]
    for path in files:
        with open(path) as f:
            job = hcl2.load(f)
        found = 0
        for name, body in tasks(job):
            found += 1
            config = body["config"][0]
            command = unquote(config["command"])
            args = [unquote(a) for a in config["args"]]
            if command != "/usr/local/bin/flotilla" or len(args) != 3 or args[1] != "--config":
                sys.exit(f"{path}: task {name}: expected /usr/local/bin/flotilla ROLE --config FILE, got {command} {args}")
            templates = {unquote(t["destination"]): heredoc(t["data"]) for t in body.get("template", [])}
            if args[2] not in templates:
                sys.exit(f"{path}: task {name}: no template renders {args[2]}")
            toml = re.sub(r"\{\{.*?\}\}", placeholder, templates[args[2]])
            with tempfile.NamedTemporaryFile("w", suffix=".toml") as t:
                t.write(toml)
                t.flush()
                out = subprocess.run([binary, args[0], "--config", t.name, "--help"], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{path}: task {name}: {out.stderr.strip()}")
            print(f"{path}: task {name}: flotilla {args[0]} with {len(toml.splitlines())} config lines: ok")
        if found == 0:
            sys.exit(f"{path}: no task")


if __name__ == "__main__":
    main()
