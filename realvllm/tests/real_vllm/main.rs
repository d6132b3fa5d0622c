//! The real-engine test tier: a real vLLM (CPU build, tiny Llama, LoRA adapter; see
//! `../shared/real-vllm/README.md`) driven by the agent, served through the gateway, read by
//! the engine client, and compared with the sim.
//!
//! A custom harness (`harness = false`), so the tier controls what runs at once: at most two
//! vLLM servers (≈3 GB each) — one standalone (`vllm serve`, started here) and one the
//! agent starts for the `Model` it is assigned — and tears every process down at the end.
//! Checks run in order and print `test NAME ... ok|FAILED`; a positional argument filters
//! them by substring. Without an installed real vLLM the tier prints why and passes, unless
//! `FLOTILLA_REQUIRE_REAL_VLLM=1` (set by `.ci/run`), which makes that a failure.

mod adapters;
mod bench_serve;
mod checks;
mod cluster;
mod conformance;
mod engine_key;
mod engine_tls;
mod gang;
mod hf_tokenizer;
mod install;
mod kv_aware;
mod pd;
mod procs;
mod rollout;

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use tokio::time::Instant;

use install::RealVllm;

/// The outcome of the run so far.
pub struct Tier {
    pub install: RealVllm,
    pub bin: std::path::PathBuf,
    pub dir: tempfile::TempDir,
    filter: Option<String>,
    failures: Vec<String>,
    passed: usize,
    /// (what, measurement) lines for the summary.
    pub timings: Vec<(String, String)>,
}

impl Tier {
    /// Runs one named check unless filtered out; records and prints its outcome. True
    /// when it ran and passed.
    pub async fn check<F: Future<Output = anyhow::Result<()>>>(&mut self, name: &str, f: impl FnOnce() -> F) -> bool {
        if self.filter.as_ref().is_some_and(|flt| !name.contains(flt.as_str())) {
            return false;
        }
        self.setup(name, f).await
    }

    /// Like [`Tier::check`], but never filtered out: a step later checks depend on.
    pub async fn setup<F: Future<Output = anyhow::Result<()>>>(&mut self, name: &str, f: impl FnOnce() -> F) -> bool {
        let t0 = Instant::now();
        let r = f().await;
        let took = t0.elapsed().as_secs_f64();
        match r {
            Ok(()) => {
                self.passed += 1;
                println!("test {name} ... ok ({took:.1} s)");
                true
            }
            Err(e) => {
                println!("test {name} ... FAILED ({took:.1} s)\n{e:#}\n");
                self.failures.push(name.to_string());
                false
            }
        }
    }

    pub fn timing(&mut self, what: &str, value: String) {
        println!("  timing: {what}: {value}");
        self.timings.push((what.to_string(), value));
    }
}

/// `FLOTILLA_REQUIRE_REAL_VLLM=1`: what the tier needs must be there (CI), no skipping.
pub fn required() -> bool {
    std::env::var("FLOTILLA_REQUIRE_REAL_VLLM").is_ok_and(|v| v == "1")
}

fn main() -> ExitCode {
    let required = required();
    let install = match RealVllm::locate() {
        Ok(i) => i,
        Err(why) if required => {
            eprintln!("real_vllm: FAILED: FLOTILLA_REQUIRE_REAL_VLLM=1 but {why}");
            return ExitCode::FAILURE;
        }
        Err(why) => {
            println!("real_vllm: SKIPPED (the real-engine tier did not run): {why}");
            return ExitCode::SUCCESS;
        }
    };
    let bin = match install::flotilla_bin() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("real_vllm: FAILED: {why}");
            return ExitCode::FAILURE;
        }
    };
    // libtest flags (--nocapture, --test-threads=N, ...) are accepted and ignored.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let started = Instant::now();
    let tier = Tier {
        install,
        bin,
        dir: tempfile::Builder::new().prefix("flotilla-real-vllm-").tempdir().expect("temp dir"),
        filter,
        failures: Vec::new(),
        passed: 0,
        timings: Vec::new(),
    };
    println!("real_vllm: real vLLM at {}, flotilla at {}", tier.install.dir.display(), tier.bin.display());
    let tier = rt.block_on(checks::run(tier));
    rt.shutdown_timeout(Duration::from_secs(5));
    println!(
        "\nreal_vllm: {} passed, {} failed in {:.0} s",
        tier.passed,
        tier.failures.len(),
        started.elapsed().as_secs_f64()
    );
    for (what, v) in &tier.timings {
        println!("  {what}: {v}");
    }
    if tier.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failed: {}", tier.failures.join(", "));
        ExitCode::FAILURE
    }
}
