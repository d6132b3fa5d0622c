#!/usr/bin/env python3
"""Records vLLM's prefill/decode protocol on the real CPU vLLM (../shared/real-vllm) into
realvllm/tests/data/pd/: starts two `vllm serve` of the tiny model with the NixlConnector
as flotilla's agent configures it (kv_both, UCX; NIXL from PyPI's nixl + nixl-cu13, which
.ci/real-vllm.sh installs), P and D, each with its own side-channel port, then sends what
flotilla's gateway sends (gateway/src/pd.rs): a prefill leg to P (kv_transfer_params
{do_remote_decode: true, ...}, max_tokens 1, stream false) and a decode leg to D with P's
answer's kv_transfer_params, for a completion and a chat. Writes P's answers
(prefill-completion.json, prefill-chat.json), D's (decode-completion.json,
decode-chat.json) and D's /metrics after both (decode-metrics.txt);
realvllm/tests/samples.rs holds the sim to them.

usage: FLOTILLA_REAL_VLLM=DIR python3 realvllm/record_pd.py [OUT_DIR]
"""
import json, os, sys, urllib.error, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tiny_vllm import spawn, stop, wait_healthy

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "tests/data/pd")
P_PORT, D_PORT = 18431, 18432
# The agent's NixlConnector config (agent/src/kv_transfer.rs), less its engine_id.
KV = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both",
                 "kv_connector_extra_config": {"backends": ["UCX"]}})
PREFILL = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}
PROMPT = " ".join(f"word{i}" for i in range(100))


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        return json.load(urllib.request.urlopen(req, timeout=120))
    except urllib.error.HTTPError as e:
        sys.exit(f"{path} on :{port}: {e.code} {e.read().decode()}")


def engine(port, side, name):
    log = f"/tmp/record-pd-{name}.log"
    env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side)}
    return spawn(port, ["--kv-transfer-config", KV], log, env), log


def save(name, value):
    with open(os.path.join(OUT, name), "w") as f:
        if isinstance(value, str):
            f.write(value)
        else:
            json.dump(value, f, indent=1)
            f.write("\n")


procs = []
try:
    (p, p_log), (d, d_log) = engine(P_PORT, 18441, "p"), engine(D_PORT, 18442, "d")
    procs = [p, d]
    wait_healthy(p, P_PORT, p_log)
    wait_healthy(d, D_PORT, d_log)
    os.makedirs(OUT, exist_ok=True)
    for kind, path, body in [
        ("completion", "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}),
        ("chat", "/v1/chat/completions",
         {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0}),
    ]:
        pre = post(P_PORT, path, dict(body, kv_transfer_params=PREFILL, max_tokens=1, stream=False))
        save(f"prefill-{kind}.json", pre)
        dec = post(D_PORT, path, dict(body, kv_transfer_params=pre["kv_transfer_params"]))
        save(f"decode-{kind}.json", dec)
        print(kind, "prefill kv_transfer_params:", json.dumps(pre["kv_transfer_params"]))
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{D_PORT}/metrics", timeout=10).read().decode()
    save("decode-metrics.txt", metrics)
    pulled = [l for l in metrics.splitlines() if l.startswith("vllm:prompt_tokens_by_source_total")]
    print("\n".join(pulled))
finally:
    for proc in procs:
        stop(proc)
print(f"recorded into {OUT}")
