//! Processes of the tier: a standalone `vllm serve`, `flotilla server` and `flotilla agent`.
//! Each runs in its own process group and is stopped (group SIGTERM, then SIGKILL) on drop,
//! so an interrupted or failed run leaves no engine behind.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process_group, Pid, Signal};

use crate::install::{RealVllm, LORA_FLAGS, SERVE_FLAGS};

/// A free loopback port (bound then released; good enough for one process we start now).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind port 0")
}

/// A child in its own process group; the whole group is stopped on drop.
pub struct Group {
    child: Option<Child>,
}

impl Group {
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Group {
        let file = std::fs::File::create(log).expect("create log");
        let err = file.try_clone().expect("clone log");
        use std::os::unix::process::CommandExt as _;
        cmd.stdin(Stdio::null()).stdout(file).stderr(err).process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Group { child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM to the group; SIGKILL after `grace`. Returns how long the leader took to go.
    pub fn stop(&mut self, grace: Duration) -> Duration {
        let t0 = Instant::now();
        let Some(mut child) = self.child.take() else { return Duration::ZERO };
        let pgid = Pid::from_raw(child.id() as i32);
        if let Some(p) = pgid {
            let _ = kill_process_group(p, Signal::CONT);
            let _ = kill_process_group(p, Signal::TERM);
        }
        while t0.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            #[allow(clippy::disallowed_methods)] // a synchronous teardown path
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = t0.elapsed();
        if let Some(p) = pgid {
            let _ = kill_process_group(p, Signal::KILL);
        }
        let _ = child.kill();
        let _ = child.wait();
        took
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `vllm serve` of the tiny model, served as `tiny`, LoRA enabled.
pub fn start_vllm(install: &RealVllm, port: u16, log: &Path) -> Group {
    let mut cmd = Command::new(install.vllm());
    cmd.arg("serve").arg(install.model());
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--served-model-name", "tiny"]);
    cmd.args(SERVE_FLAGS).args(LORA_FLAGS).envs(install.env());
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

/// `flotilla agent` with one simulated GPU, running vLLM engines through `vllm_template`.
pub fn start_agent(bin: &Path, install: &RealVllm, server: &str, dir: &Path) -> Group {
    let mut cmd = Command::new(bin);
    cmd.args(["agent", "--server", server, "--node-name", "cpu-1", "--gpus", "1", "--gpu-type", "CPU-24GB"])
        .args(["--heartbeat-interval-ms", "250", "--stop-grace-ms", "10000"])
        .arg("--data-dir")
        .arg(dir.join("agent"))
        .arg("--vllm-command")
        .arg(vllm_template(install))
        .envs(install.env())
        .env("RUST_LOG", "info");
    Group::spawn("flotilla agent", cmd, &dir.join("agent.log"))
}

/// Live (non-zombie) processes of process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After ')': state, ppid, pgrp.
        if f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string() {
            out.push(pid);
        }
    }
    out
}

/// The pid of the process whose command line holds every one of `words` (as whole words).
pub fn find_process(words: &[&str]) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if words.iter().all(|w| args.iter().any(|a| a == w)) {
            return Some(pid);
        }
    }
    None
}
