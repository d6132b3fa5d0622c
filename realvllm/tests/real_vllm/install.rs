//! Where the real vLLM is (`FLOTILLA_REAL_VLLM`, default `~/.cache/flotilla/real-vllm`, as
//! made by `../shared/real-vllm/setup.sh`), how to run it, and where the `flotilla` binary is.

use std::path::{Path, PathBuf};

/// Default install location: outside the repository so CI and developers reuse it.
pub fn default_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/flotilla/real-vllm")
}

/// An installed real vLLM with the tiny model and adapter.
#[derive(Debug, Clone)]
pub struct RealVllm {
    pub dir: PathBuf,
}

impl RealVllm {
    /// Finds the install, or says why not (and how to get one).
    pub fn locate() -> Result<RealVllm, String> {
        let dir = std::env::var_os("FLOTILLA_REAL_VLLM").map(PathBuf::from).unwrap_or_else(default_dir);
        let r = RealVllm { dir };
        for need in [r.vllm(), r.model(), r.adapter().join("adapter_config.json")] {
            if !need.exists() {
                return Err(format!(
                    "no real vLLM at {} ({} is missing); install one with \
                     `../shared/real-vllm/setup.sh {}` (~3.5 min, 6.2 GB) or point FLOTILLA_REAL_VLLM at one",
                    r.dir.display(),
                    need.display(),
                    r.dir.display()
                ));
            }
        }
        Ok(r)
    }

    pub fn vllm(&self) -> PathBuf {
        self.dir.join("venv/bin/vllm")
    }
    pub fn model(&self) -> PathBuf {
        self.dir.join("models/tiny-llama")
    }
    pub fn adapter(&self) -> PathBuf {
        self.dir.join("models/tiny-lora")
    }

    /// The environment `serve.sh` sets: CPU target, offline, runtime LoRA updates on, and
    /// the engine core in-process.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("VLLM_TARGET_DEVICE", "cpu"),
            ("HF_HUB_OFFLINE", "1"),
            ("TRANSFORMERS_OFFLINE", "1"),
            ("VLLM_NO_USAGE_STATS", "1"),
            ("DO_NOT_TRACK", "1"),
            ("VLLM_CPU_KVCACHE_SPACE", "1"),
            ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"),
            ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([("VLLM_CACHE_ROOT".to_string(), self.dir.join("cache").display().to_string())])
        .collect()
    }
}

/// Flags every test engine gets. `--dtype float32`: the tiny model is bfloat16, and vLLM's
/// CPU bfloat16 kernels die with SIGILL on CPUs without AVX512-BF16 (some of our VMs).
pub const SERVE_FLAGS: &[&str] =
    &["--max-model-len", "512", "--enforce-eager", "--distributed-executor-backend", "uni", "--dtype", "float32"];

/// LoRA flags (runtime loading of the rank-8 tiny adapter, two slots).
pub const LORA_FLAGS: &[&str] = &["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"];

/// The `flotilla` binary under test: `FLOTILLA_BIN` (set by `scripts/test`), else the
/// workspace's debug build.
pub fn flotilla_bin() -> Result<PathBuf, String> {
    let p = match std::env::var_os("FLOTILLA_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            // A relative CARGO_TARGET_DIR is relative to the workspace root, not to this
            // test's working directory (the package directory).
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| "target".into());
            root.join(target).join("debug/flotilla")
        }
    };
    match p.exists() {
        true => Ok(p),
        false => {
            Err(format!("no flotilla binary at {} (cargo build --bin flotilla, or set FLOTILLA_BIN)", p.display()))
        }
    }
}
