"""`vllm serve` of the real CPU vLLM's tiny model (../shared/real-vllm), for the recorders
in this directory (record_kv_events.py, record_tokenize.py, record_pd.py): the environment
and command they share, a start that waits for /health, and a stop of the whole process
group.
"""
import os, subprocess, sys, time, urllib.request

D = os.environ.get("FLOTILLA_REAL_VLLM", os.path.expanduser("~/.cache/flotilla/real-vllm"))
ENV = dict(os.environ, VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CPU_KVCACHE_SPACE="1",
           VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_HOST_IP="127.0.0.1", VLLM_CACHE_ROOT=os.path.join(D, "cache"))


def spawn(port, extra, log_path, env=None):
    """Starts the tiny model served as `tiny` on 127.0.0.1:port with `extra` flags (and
    `env` laid over ENV) in its own process group; does not wait."""
    cmd = [os.path.join(D, "venv/bin/vllm"), "serve", os.path.join(D, "models/tiny-llama"), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "512", "--enforce-eager",
           "--distributed-executor-backend", "uni", "--dtype", "float32", *extra]
    return subprocess.Popen(cmd, env=dict(ENV, **(env or {})), stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_healthy(proc, port, log_path):
    """Waits (up to 240 s) for /health of `proc`; stops it and exits the script if vLLM dies
    or does not become healthy."""
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


def serve(port, extra, log_path, env=None):
    """spawn() and wait_healthy()."""
    return wait_healthy(spawn(port, extra, log_path, env), port, log_path)


def stop(proc):
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        pass
    proc.wait(30)
