//! Processes of the tier: a standalone `vllm serve`, `flotilla server` and `flotilla agent`.
//! Each runs in its own process group (a shared `flotilla_testkit::procs::Group`) and is
//! stopped (group SIGTERM, then SIGKILL) on drop, so an interrupted or failed run leaves no
//! engine behind.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;

use flotilla_testkit::procs::{log_tail, Group};

use crate::install::{RealVllm, LORA_FLAGS, SERVE_FLAGS};

/// `vllm serve` of the tiny model, served as `tiny`, LoRA enabled, publishing its KV cache
/// events on free ports of 127.0.0.1 (found at `GET /kv_event_sources`).
pub fn start_vllm(install: &RealVllm, port: u16, log: &Path) -> Group {
    let mut cmd = Command::new(install.vllm());
    cmd.arg("serve").arg(install.model());
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--served-model-name", "tiny"]);
    cmd.args(SERVE_FLAGS).args(LORA_FLAGS).envs(install.env());
    let events = r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:0","replay_endpoint":"tcp://*:0","topic":"kv@s"}"#;
    cmd.args(["--kv-events-config", events]).env("VLLM_HOST_IP", "127.0.0.1");
    Group::spawn("vllm", cmd, log)
}

/// `flotilla server` (one member, bootstrapping); returns it and its gRPC address.
pub fn start_server(bin: &Path, dir: &Path) -> (Group, String) {
    let log = dir.join("server.log");
    let mut cmd = Command::new(bin);
    cmd.args(["server", "--id", "1", "--bootstrap", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("server"))
        .env("RUST_LOG", "warn");
    let g = Group::spawn("flotilla server", cmd, &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(addr) = text.split_whitespace().find_map(|w| w.strip_prefix("grpc=")) {
            return (g, addr.to_string());
        }
        assert!(Instant::now() < deadline, "flotilla server printed no address:\n{}", log_tail(&log, 20));
        #[allow(clippy::disallowed_methods)] // start-up poll before the runtime has work
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `--vllm-command` template the agent gets: the install's `vllm`, the tier's flags.
pub fn vllm_template(install: &RealVllm) -> String {
    let mut t = format!(
        "{} serve {{source}} --host {{host}} --port {{port}} --served-model-name {{model}}",
        install.vllm().display()
    );
    for f in SERVE_FLAGS {
        t.push(' ');
        t.push_str(f);
    }
    t.push_str(" {args}");
    t
}

/// `flotilla agent` with one simulated GPU, running vLLM engines through `vllm_template`,
/// with `extra` flags. It stops its engines when it exits: an engine in its own process
/// group would otherwise outlive the run when the checks that delete the Model are filtered
/// out.
pub fn start_agent(bin: &Path, install: &RealVllm, server: &str, dir: &Path, extra: &[&str]) -> Group {
    let mut cmd = Command::new(bin);
    cmd.args(["agent", "--server", server, "--node-name", "cpu-1", "--gpus", "1", "--gpu-type", "CPU-24GB"])
        .arg("--stop-engines-on-exit")
        .args(["--heartbeat-interval-ms", "250", "--stop-grace-ms", "10000"])
        .arg("--data-dir")
        .arg(dir.join("agent"))
        .arg("--vllm-command")
        .arg(vllm_template(install))
        .args(extra)
        .envs(install.env())
        .env("RUST_LOG", "info");
    Group::spawn("flotilla agent", cmd, &dir.join("agent.log"))
}
