"""`vllm serve` of the real CPU vLLM's tiny model (../shared/real-vllm), for the recorders
in this directory (record_kv_events.py, record_tokenize.py): the environment and command
they share, a start that waits for /health, and a stop of the whole process group.
"""
import os, subprocess, sys, time, urllib.request

D = os.environ.get("FLOTILLA_REAL_VLLM", os.path.expanduser("~/.cache/flotilla/real-vllm"))
ENV = dict(os.environ, VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CPU_KVCACHE_SPACE="1",
           VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_HOST_IP="127.0.0.1", VLLM_CACHE_ROOT=os.path.join(D, "cache"))


def serve(port, extra, log_path):
    """Starts the tiny model served as `tiny` on 127.0.0.1:port with `extra` flags and waits
    (up to 240 s) for /health; exits the script if vLLM dies first."""
    cmd = [os.path.join(D, "venv/bin/vllm"), "serve", os.path.join(D, "models/tiny-llama"), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "512", "--enforce-eager",
           "--distributed-executor-backend", "uni", "--dtype", "float32", *extra]
    proc = subprocess.Popen(cmd, env=ENV, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except Exception:
            if proc.poll() is not None:
                sys.exit(f"vllm exited; see {log_path}")
            time.sleep(1)
    stop(proc)
    sys.exit(f"vllm not healthy in 240 s; see {log_path}")


def stop(proc):
    os.killpg(proc.pid, 15)
    proc.wait(30)
