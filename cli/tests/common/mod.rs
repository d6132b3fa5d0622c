//! Helpers for multi-process tests: start `flotilla server`, `agent` and `gateway`
//! processes on loopback, each with its own temp data dir, and talk to them over gRPC.
//! Signals, `/proc` scans and raw HTTP are the shared `flotilla_testkit` ones.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_api::pb::cluster_service_client::ClusterServiceClient;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ListRequest, StatusRequest, StatusResponse};
use flotilla_testkit::proc_fs;
pub use flotilla_testkit::procs::Signal;
use flotilla_testkit::procs::{kill_and_reap, signal};
pub use flotilla_testkit::raw_http;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// The binary the process helpers below start: `FLOTILLA_TEST_BIN` when set (a benchmark
/// runs a test against the release build), else the one Cargo built for this test.
pub fn bin() -> String {
    std::env::var("FLOTILLA_TEST_BIN").ok().filter(|b| !b.is_empty()).unwrap_or_else(|| BIN.to_owned())
}

/// One `flotilla server` process.
pub struct ServerProc {
    pub id: u64,
    pub grpc: String,
    /// `host:port` of its HTTP listener (`/metrics`, health).
    pub http: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
}

impl ServerProc {
    /// Starts a server and waits for its "listening" line. `grpc` may use port 0.
    pub fn start(id: u64, data_dir: &Path, grpc: &str, extra: &[&str]) -> ServerProc {
        let mut child = Command::new(bin())
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
        let http = line.split_whitespace().find_map(|w| w.strip_prefix("http=")).unwrap_or_default().to_owned();
        ServerProc { id, grpc, http, data_dir: data_dir.to_owned(), child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: Signal) {
        assert!(signal(self.pid(), sig), "kill {sig:?} failed");
    }

    /// SIGKILL (after SIGCONT, so a paused server dies too), and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM (a clean stop, as systemd does) and wait up to `limit` for the exit; SIGKILL
    /// past it. Returns how long it took to go.
    pub async fn terminate(&mut self, limit: Duration) -> Duration {
        let t0 = tokio::time::Instant::now();
        if let Some(mut c) = self.child.take() {
            signal(c.id(), Signal::TERM);
            while t0.elapsed() < limit {
                if let Ok(Some(_)) = c.try_wait() {
                    return t0.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            kill_and_reap(&mut c);
        }
        t0.elapsed()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
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

/// One acknowledged write of [`write_tenants`]: its object name, when it was sent and when
/// the answer came.
#[derive(Debug, Clone)]
pub struct Ack {
    pub name: String,
    pub invoked: tokio::time::Instant,
    pub answered: tokio::time::Instant,
}

/// Writes new Tenants `TAG-1`, `TAG-2`, ... through `addr`, one after another, until the task
/// is aborted; records each acknowledged one in `acks`.
pub async fn write_tenants(tag: String, addr: String, acks: std::sync::Arc<std::sync::Mutex<Vec<Ack>>>) {
    let mut client = ObjectServiceClient::new(channel(&addr, Duration::from_secs(3)));
    for seq in 1u64.. {
        let name = format!("{tag}-{seq}");
        let manifest = format!("kind: Tenant\nmetadata:\n  name: {name}\nspec: {{}}\n");
        let invoked = tokio::time::Instant::now();
        if client.apply(flotilla_api::pb::ApplyRequest { manifest, expected_revision: None }).await.is_ok() {
            let answered = tokio::time::Instant::now();
            acks.lock().unwrap_or_else(|p| p.into_inner()).push(Ack { name, invoked, answered });
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long after `t0` the first write named `PREFIX...` and sent at or after `t0` was
/// acknowledged.
pub fn first_ack_after(acks: &[Ack], prefix: &str, t0: tokio::time::Instant) -> Option<Duration> {
    acks.iter().filter(|a| a.name.starts_with(prefix) && a.invoked >= t0).map(|a| a.answered - t0).min()
}

/// No acknowledged write lost: every one is there, read linearizably through `addr`.
pub async fn assert_all_present(addr: &str, acks: &[Ack]) {
    let mut client = ObjectServiceClient::new(channel(addr, Duration::from_secs(3)));
    for a in acks {
        let req = flotilla_api::pb::GetRequest { kind: "tenant".into(), name: a.name.clone(), stale: false };
        let r = client.get(req).await;
        assert!(r.is_ok(), "acknowledged write {} is missing: {r:?}", a.name);
    }
}

/// The leader once a 3-server cluster has recovered from the last fault: every server names
/// the same leader and term, counts 3 voters and has applied the same store revision (a
/// healed server has caught up, so the next fault is a single one, not a second on top).
pub async fn settled_leader(addrs: &[String], limit: Duration) -> u64 {
    let t0 = tokio::time::Instant::now();
    loop {
        let mut seen = Vec::new();
        for a in addrs {
            let s = status(a).await;
            seen.push(s.map(|r| (r.leader_id, r.term, r.members.iter().filter(|m| m.voter).count(), r.store_revision)));
        }
        if let Some(Some(first)) = seen.first() {
            if first.0 != 0 && first.2 == 3 && seen.iter().all(|s| s.as_ref() == Some(first)) {
                return first.0;
            }
        }
        assert!(t0.elapsed() < limit, "the servers did not settle within {limit:?}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// One `flotilla agent` process with simulated GPUs.
pub struct AgentProc {
    pub name: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
}

impl AgentProc {
    /// Starts an agent for node `name` with `gpus` simulated A100s. Its sim engines carry
    /// `--seed <marker>` so a test can find every engine process it caused.
    pub fn start(name: &str, data_dir: &Path, servers: &str, gpus: u32, marker: u64) -> AgentProc {
        Self::start_with_env(name, data_dir, servers, gpus, marker, &[])
    }

    /// [`AgentProc::start`] with these variables added to the agent's environment.
    pub fn start_with_env(
        name: &str,
        data_dir: &Path,
        servers: &str,
        gpus: u32,
        marker: u64,
        env: &[(&str, &str)],
    ) -> AgentProc {
        Self::start_with(name, data_dir, servers, gpus, marker, env, &[])
    }

    /// [`AgentProc::start_with_env`] with these flags added.
    pub fn start_with(
        name: &str,
        data_dir: &Path,
        servers: &str,
        gpus: u32,
        marker: u64,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> AgentProc {
        let child = Command::new(bin())
            .args(["agent", "--server", servers, "--node-name", name, "--gpus", &gpus.to_string()])
            .args(["--gpu-type", "A100-80GB", "--heartbeat-interval-ms", "200"])
            .arg("--data-dir")
            .arg(data_dir)
            .arg(format!("--sim-args=--speedup 50 --allow-faults --seed {marker}"))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn flotilla agent");
        AgentProc { name: name.to_owned(), data_dir: data_dir.to_owned(), child: Some(child) }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    /// The agent's process id (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM and wait: the agent exits, leaving its engines to a successor.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), Signal::TERM);
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `flotilla gateway` process (no auth, port 0 unless given); killed on drop.
pub struct GatewayProc {
    /// `host:port` of its HTTP listener.
    pub addr: String,
    child: Child,
}

impl GatewayProc {
    /// Starts a gateway for the comma-separated `servers` and waits for its banner.
    pub fn start(servers: &str, extra: &[&str]) -> GatewayProc {
        Self::start_on(servers, "127.0.0.1:0", extra)
    }

    /// [`GatewayProc::start`] listening on `listen`.
    pub fn start_on(servers: &str, listen: &str, extra: &[&str]) -> GatewayProc {
        let mut args = vec!["--server", servers, "gateway", "--listen", listen, "--no-auth"];
        args.extend_from_slice(extra);
        GatewayProc::spawn(&args)
    }

    /// `flotilla ARGS` (a gateway command line of its own, e.g. `gateway --federation ...`),
    /// waiting for its banner.
    pub fn spawn(args: &[&str]) -> GatewayProc {
        let mut child = Command::new(bin())
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn flotilla gateway");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read banner");
        let addr = line.split("http://").nth(1).expect("gateway banner").trim().to_owned();
        GatewayProc { addr, child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait up to `limit` for the exit (SIGKILL past it); returns how long the
    /// gateway took to go and whether it exited with success.
    pub async fn terminate(&mut self, limit: Duration) -> (Duration, bool) {
        let t0 = tokio::time::Instant::now();
        signal(self.child.id(), Signal::TERM);
        while t0.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                return (t0.elapsed(), st.success());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill_and_reap(&mut self.child);
        (t0.elapsed(), false)
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// PIDs of live engine processes started with `--seed <marker>`.
pub fn engine_pids(marker: u64) -> Vec<u32> {
    let needle = format!("--seed\0{marker}\0");
    proc_fs::pids()
        .filter(|pid| {
            let Some(cmdline) = proc_fs::cmdline(*pid) else { return false };
            let zombie = proc_fs::stat(*pid).is_some_and(|s| s.state == 'Z');
            !zombie && String::from_utf8_lossy(&cmdline).contains(&needle)
        })
        .collect()
}

/// Kills every engine process carrying `marker` (test teardown).
pub fn kill_engines(marker: u64) {
    for pid in engine_pids(marker) {
        signal(pid, Signal::KILL);
    }
}

/// A unique marker for this test's engines.
pub fn marker() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    1_000_000_000 + (std::process::id() as u64 * 7919 + nanos) % 1_000_000_000
}

/// A replica as the store shows it.
#[derive(Debug, Clone)]
pub struct ReplicaView {
    pub name: String,
    pub model: String,
    pub node: Option<String>,
    pub gpus: Vec<u64>,
    pub phase: String,
    pub endpoint: Option<String>,
    pub restarts: u64,
    pub reason: String,
}

pub fn replica_view(o: &flotilla_api::pb::Object) -> ReplicaView {
    let spec: serde_json::Value = serde_json::from_str(&o.spec_json).unwrap_or_default();
    let status: serde_json::Value = serde_json::from_str(&o.status_json).unwrap_or_default();
    ReplicaView {
        name: o.name.clone(),
        model: spec["model"].as_str().unwrap_or_default().to_owned(),
        node: spec["node"].as_str().map(str::to_owned),
        gpus: spec["gpus"].as_array().map(|a| a.iter().filter_map(|g| g.as_u64()).collect()).unwrap_or_default(),
        phase: status["phase"].as_str().unwrap_or("Pending").to_owned(),
        endpoint: status["endpoint"].as_str().map(str::to_owned),
        restarts: status["restarts"].as_u64().unwrap_or(0),
        reason: status["reason"].as_str().unwrap_or_default().to_owned(),
    }
}

/// Replicas of `model` (a linearizable read through any of `servers`).
pub async fn replicas(servers: &[String], model: &str) -> Vec<ReplicaView> {
    for addr in servers {
        let mut c = ObjectServiceClient::new(channel(addr, Duration::from_secs(3)));
        let req = ListRequest { kind: "replica".into(), label_selector: format!("model={model}"), stale: false };
        if let Ok(r) = c.list(req).await {
            return r.into_inner().objects.iter().map(replica_view).collect();
        }
    }
    Vec::new()
}

/// Polls until `pred` holds for the replicas of `model`, or panics after `secs`.
pub async fn wait_replicas(
    servers: &[String],
    model: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&[ReplicaView]) -> bool,
) -> Vec<ReplicaView> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let r = replicas(servers, model).await;
        if pred(&r) {
            return r;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}: {r:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn ready(r: &[ReplicaView]) -> usize {
    r.iter().filter(|x| x.phase == "Ready").count()
}

/// Sends one chat completion to an engine with its API key; true if it answered 200 with a
/// choice.
pub fn chat_ok(endpoint: &str, model: &str, key: &str) -> bool {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":4}}"#);
    engine_call(endpoint, "POST", "/v1/chat/completions", &body, key).0 == 200
}

/// One request to an engine, with its API key as the bearer token (none when `key` is
/// empty): (status, body), (0, "") when it could not connect.
pub fn engine_call(endpoint: &str, method: &str, path: &str, body: &str, key: &str) -> (u16, String) {
    let auth = format!("Bearer {key}");
    let headers: &[(&str, &str)] = if key.is_empty() { &[] } else { &[("Authorization", auth.as_str())] };
    match raw_http::send_blocking_with(endpoint, method, path, body, Duration::from_secs(60), headers) {
        Some(out) => (raw_http::status_code(&out).unwrap_or(0), raw_http::body_of(&out).to_owned()),
        None => (0, String::new()),
    }
}

/// The engine API key of each ready replica (replica name to key), from the endpoint table
/// the leader streams to gateways: the one place outside the agents and servers that holds
/// them (replica objects do not show them).
pub async fn engine_keys(servers: &[String]) -> std::collections::BTreeMap<String, String> {
    use flotilla_api::pb::fleet_service_client::FleetServiceClient;
    use flotilla_api::pb::WatchEndpointsRequest;
    for addr in servers {
        let mut c = FleetServiceClient::new(channel(addr, Duration::from_secs(3)));
        let Ok(stream) = c.watch_endpoints(WatchEndpointsRequest { model: String::new() }).await else { continue };
        if let Ok(Some(set)) = stream.into_inner().message().await {
            return set.endpoints.into_iter().map(|e| (e.replica, e.api_key)).collect();
        }
    }
    Default::default()
}

/// Applies a manifest through whichever server takes it (retried while leaders change).
pub async fn apply(servers: &[String], manifest: String) {
    for _ in 0..50 {
        for addr in servers {
            let mut c = ObjectServiceClient::new(channel(addr, Duration::from_secs(5)));
            let req = flotilla_api::pb::ApplyRequest { manifest: manifest.clone(), expected_revision: None };
            match c.apply(req).await {
                Ok(_) => return,
                Err(s) if s.code() == tonic::Code::InvalidArgument => panic!("apply refused: {s}"),
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("apply failed on every server");
}

/// Three servers and `agents` agents with simulated GPUs; agents and engines die on drop.
pub struct Fleet {
    pub _dir: tempfile::TempDir,
    pub servers: Vec<ServerProc>,
    pub agents: Vec<AgentProc>,
    pub addrs: Vec<String>,
    pub marker: u64,
}

impl Fleet {
    pub async fn start(agents: usize, gpus: u32) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let servers = start_three(dir.path());
        wait_voters(&servers[0].grpc, 3).await;
        let addrs: Vec<String> = servers.iter().map(|s| s.grpc.clone()).collect();
        let list = addrs.join(",");
        let marker = marker();
        let agents: Vec<AgentProc> = (1..=agents)
            .map(|i| {
                AgentProc::start(&format!("node-{i}"), &dir.path().join(format!("agent-{i}")), &list, gpus, marker)
            })
            .collect();
        // Every agent registered before a test places anything: a model applied while one is
        // still connecting would be placed on the others alone.
        wait_nodes_ready(&addrs, agents.len()).await;
        Fleet { _dir: dir, servers, agents, addrs, marker }
    }
}

/// Waits until the leader lists `n` nodes, all Ready (asked of each server in turn: only the
/// leader answers `ListNodes`); panics after 30 s.
pub async fn wait_nodes_ready(servers: &[String], n: usize) {
    use flotilla_api::pb::fleet_service_client::FleetServiceClient;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        for addr in servers {
            let mut c = FleetServiceClient::new(channel(addr, Duration::from_secs(3)));
            if let Ok(r) = c.list_nodes(flotilla_api::pb::ListNodesRequest {}).await {
                let nodes = r.into_inner().nodes;
                if nodes.len() == n && nodes.iter().all(|x| x.state == "Ready") {
                    return;
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} agents did not all register within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.kill();
        }
        kill_engines(self.marker);
    }
}

/// The objects of `kind` matching `selector` (a linearizable list through the first of
/// `servers` that answers); empty if none does.
pub async fn list_objects(servers: &[String], kind: &str, selector: &str) -> Vec<flotilla_api::pb::Object> {
    for addr in servers {
        let mut c = ObjectServiceClient::new(channel(addr, Duration::from_secs(3)));
        let req = ListRequest { kind: kind.into(), label_selector: selector.into(), stale: false };
        if let Ok(r) = c.list(req).await {
            return r.into_inner().objects;
        }
    }
    Vec::new()
}

/// An adapter's stored status (Null if no server answers).
pub async fn adapter_status(servers: &[String], name: &str) -> serde_json::Value {
    for addr in servers {
        let mut c = ObjectServiceClient::new(channel(addr, Duration::from_secs(3)));
        let req = flotilla_api::pb::GetRequest { kind: "adapter".into(), name: name.into(), stale: false };
        if let Ok(r) = c.get(req).await {
            let o = r.into_inner().object.unwrap_or_default();
            return serde_json::from_str(&o.status_json).unwrap_or_default();
        }
    }
    serde_json::Value::Null
}

/// Adapter names bound to each replica of the model `base` (`spec.adapters`).
pub async fn bindings(servers: &[String]) -> std::collections::BTreeMap<String, Vec<String>> {
    list_objects(servers, "replica", "model=base")
        .await
        .iter()
        .map(|o| {
            let spec: serde_json::Value = serde_json::from_str(&o.spec_json).unwrap_or_default();
            let names = spec["adapters"]
                .as_array()
                .map(|a| a.iter().filter_map(|b| b["name"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            (o.name.clone(), names)
        })
        .collect()
}

/// An Adapter of the model `base` with a sim adapter of rank 8; `replicas` as the spec takes it.
pub fn adapter_manifest(name: &str, replicas: &str) -> String {
    format!("kind: Adapter\nmetadata: {{name: {name}}}\nspec: {{base_model: base, source: 'sim://{name}?rank=8', replicas: {replicas}}}\n")
}
