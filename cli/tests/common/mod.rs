//! Helpers for multi-process tests: start `flotilla server` processes on loopback, each with
//! its own temp data dir, and talk to them over gRPC.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_api::pb::cluster_service_client::ClusterServiceClient;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ListRequest, StatusRequest, StatusResponse};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// One `flotilla server` process.
pub struct ServerProc {
    pub id: u64,
    pub grpc: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
}

impl ServerProc {
    /// Starts a server and waits for its "listening" line. `grpc` may use port 0.
    pub fn start(id: u64, data_dir: &Path, grpc: &str, extra: &[&str]) -> ServerProc {
        let mut child = Command::new(BIN)
            .args(["server", "--id", &id.to_string(), "--grpc-addr", grpc, "--http-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--heartbeat-ms", "50", "--election-timeout-min-ms", "250", "--election-timeout-max-ms", "500"])
            .args(extra)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn flotilla server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read banner");
        let grpc = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .unwrap_or_else(|| panic!("server {id} printed no address: {line:?}"))
            .to_owned();
        ServerProc { id, grpc, data_dir: data_dir.to_owned(), child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.pid().to_string()]).status().expect("kill").success();
        assert!(ok, "kill {sig} failed");
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
        self.kill();
    }
}

/// Three servers: 1 bootstraps, 2 and 3 join it.
pub fn start_three(dir: &Path) -> Vec<ServerProc> {
    let s1 = ServerProc::start(1, &dir.join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    let seed = s1.grpc.clone();
    let s2 = ServerProc::start(2, &dir.join("s2"), "127.0.0.1:0", &["--join", &seed]);
    let s3 = ServerProc::start(3, &dir.join("s3"), "127.0.0.1:0", &["--join", &seed]);
    vec![s1, s2, s3]
}

pub fn channel(addr: &str, timeout: Duration) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout)
        .connect_lazy()
}

pub async fn status(addr: &str) -> Option<StatusResponse> {
    let mut c = ClusterServiceClient::new(channel(addr, Duration::from_secs(2)));
    c.status(StatusRequest { local: true }).await.ok().map(|r| r.into_inner())
}

/// Waits until `via` reports `n` voters and a leader; returns the leader's ID.
pub async fn wait_voters(via: &str, n: usize) -> u64 {
    for _ in 0..400 {
        if let Some(s) = status(via).await {
            if s.leader_id != 0 && s.members.iter().filter(|m| m.voter).count() == n {
                return s.leader_id;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cluster did not reach {n} voters");
}

/// Model names in the local replica of the server at `addr` (a stale read).
pub async fn local_names(addr: &str) -> Option<Vec<String>> {
    let mut c = ObjectServiceClient::new(channel(addr, Duration::from_secs(2)));
    let r = c.list(ListRequest { kind: "model".into(), label_selector: String::new(), stale: true }).await.ok()?;
    Some(r.into_inner().objects.into_iter().map(|o| o.name).collect())
}

/// Waits until the server at `addr` holds every name in `want`; returns what is missing.
pub async fn wait_holds_all(addr: &str, want: &[String]) -> Vec<String> {
    let mut missing = want.to_vec();
    for _ in 0..200 {
        if let Some(have) = local_names(addr).await {
            missing = want.iter().filter(|n| !have.contains(n)).cloned().collect();
            if missing.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    missing
}

pub fn model(name: &str) -> String {
    format!("kind: Model\nmetadata:\n  name: {name}\nspec:\n  engine: sim\n  source: file:///models/{name}\n")
}
