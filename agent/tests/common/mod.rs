//! Test helpers: a fake `AgentService` server that records registrations and heartbeats
//! and sends `Assign`, the sim binary to run engines with, and an agent wrapper whose Drop
//! kills every engine process group it ever saw (no orphans, even when a test fails).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use clap::Parser;
use flotilla_agent::{AgentArgs, AgentHandle};
use flotilla_api::pb::{self, agent_message::Msg, agent_service_server, server_message};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

// Shared helpers the tests use through `common::*` (not every test binary uses each).
#[allow(unused_imports)]
pub use flotilla_testkit::proc_fs::alive;
use flotilla_testkit::procs::{signal_group, Signal};
#[allow(unused_imports)]
pub use flotilla_testkit::raw_http::{http_get, http_request, http_request_with_key};
#[allow(unused_imports)]
pub use flotilla_testkit::wait::eventually;

/// What the fake server saw.
#[derive(Default, Debug)]
pub struct Seen {
    pub registrations: Vec<pb::Register>,
    pub heartbeats: usize,
    pub last: Option<pb::Heartbeat>,
    /// Every pid ever reported (for cleanup).
    pub pids: BTreeSet<u32>,
}

#[derive(Clone)]
struct Svc {
    seen: Arc<Mutex<Seen>>,
    reject: Option<(tonic::Code, String)>,
    assign: watch::Receiver<Option<Vec<pb::ReplicaAssignment>>>,
}

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl agent_service_server::AgentService for Svc {
    type SessionStream = OutStream;

    async fn session(&self, req: Request<Streaming<pb::AgentMessage>>) -> Result<Response<OutStream>, Status> {
        if let Some((code, msg)) = &self.reject {
            return Err(Status::new(*code, msg.clone()));
        }
        let mut inbound = req.into_inner();
        let first = inbound.next().await.ok_or_else(|| Status::invalid_argument("no Register"))??;
        let Some(Msg::Register(reg)) = first.msg else { return Err(Status::invalid_argument("Register first")) };
        let node = reg.node_name.clone();
        self.seen.lock().unwrap().registrations.push(reg);
        let (tx, rx) = mpsc::channel(16);
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = inbound.next().await {
                if let Some(Msg::Heartbeat(hb)) = m.msg {
                    let mut s = seen.lock().unwrap();
                    s.heartbeats += 1;
                    s.pids.extend(hb.engines.iter().map(|e| e.pid).filter(|p| *p > 0));
                    s.last = Some(hb);
                }
            }
        });
        let mut assign = self.assign.clone();
        tokio::spawn(async move {
            let registered = pb::Registered { node_name: node, heartbeat_interval_ms: 0 };
            if tx.send(Ok(pb::ServerMessage { msg: Some(server_message::Msg::Registered(registered)) })).await.is_err()
            {
                return;
            }
            loop {
                let current = assign.borrow_and_update().clone();
                if let Some(replicas) = current {
                    let msg = pb::ServerMessage { msg: Some(server_message::Msg::Assign(pb::Assign { replicas })) };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = assign.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// A fake server on 127.0.0.1:0.
pub struct FakeServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    assign: watch::Sender<Option<Vec<pb::ReplicaAssignment>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeServer {
    /// A server that accepts every agent.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A server that answers every stream with `code` and `message`.
    pub async fn rejecting(code: tonic::Code, message: &str) -> Self {
        Self::start_with(Some((code, message.to_string()))).await
    }

    async fn start_with(reject: Option<(tonic::Code, String)>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (assign, assign_rx) = watch::channel(None);
        let svc = Svc { seen: seen.clone(), reject, assign: assign_rx };
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(agent_service_server::AgentServiceServer::new(svc))
                .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        FakeServer { addr, seen, assign, stop: Some(stop) }
    }

    /// Sends (and keeps sending to new sessions) this desired set.
    pub fn assign(&self, replicas: Vec<pb::ReplicaAssignment>) {
        let _ = self.assign.send(Some(replicas));
    }

    pub fn registrations(&self) -> Vec<pb::Register> {
        self.seen.lock().unwrap().registrations.clone()
    }

    pub fn heartbeats(&self) -> usize {
        self.seen.lock().unwrap().heartbeats
    }

    /// The engines of the last heartbeat.
    pub fn engines(&self) -> Vec<pb::EngineReport> {
        self.seen.lock().unwrap().last.as_ref().map(|h| h.engines.clone()).unwrap_or_default()
    }

    pub fn all_pids(&self) -> BTreeSet<u32> {
        self.seen.lock().unwrap().pids.clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A sim replica assignment.
pub fn sim_replica(name: &str, model: &str, gpus: &[u32]) -> pb::ReplicaAssignment {
    pb::ReplicaAssignment {
        replica: name.into(),
        model: model.into(),
        engine: "sim".into(),
        source: "file:///nonexistent/sim-needs-no-weights".into(),
        engine_args: vec![],
        gpus: gpus.to_vec(),
        adapters: vec![],
        engine_image: String::new(),
        traceparent: String::new(),
        gang: None,
        kv_transfer: None,
    }
}

/// (program, subcommand word) that runs the simulator: `$FLOTILLA_BIN sim`, else the
/// `flotilla-sim` binary of the sim crate (built once per test binary).
pub fn sim_binary() -> (PathBuf, String) {
    static BIN: OnceLock<(PathBuf, String)> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("FLOTILLA_BIN") {
            return (PathBuf::from(bin), "sim".into());
        }
        // target/debug/deps/<test> → target/debug/flotilla-sim
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let target_dir = profile_dir.parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "flotilla-sim", "--bin", "flotilla-sim"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for the flotilla-sim binary");
        assert!(status.success(), "building the flotilla-sim binary failed");
        let bin = profile_dir.join("flotilla-sim");
        assert!(bin.exists(), "{} missing after build", bin.display());
        (bin, String::new())
    })
    .clone()
}

/// Agent flags for tests: sim engines sped up, short backoffs, its data dir.
pub fn agent_args(servers: &[SocketAddr], data_dir: &Path, node: &str, extra: &[&str]) -> AgentArgs {
    // Each agent of a test binary gets its own port block: parallel tests never race for a port.
    static NEXT_BLOCK: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let block = NEXT_BLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 200;
    let ports = format!("--engine-port-range={}-{}", 30000 + block * 50, 30000 + block * 50 + 49);
    let (bin, sub) = sim_binary();
    let servers = servers.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let mut argv: Vec<String> = vec![
        "agent".into(),
        "--node-name".into(),
        node.into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--sim-binary".into(),
        bin.display().to_string(),
        format!("--sim-subcommand={sub}"),
        "--heartbeat-interval-ms".into(),
        "100".into(),
        "--stop-grace-ms".into(),
        "3000".into(),
        "--engine-start-timeout-s".into(),
        "30".into(),
    ];
    argv.push(ports);
    if !extra.iter().any(|a| a.starts_with("--sim-args")) {
        argv.push("--sim-args=--speedup 50".into());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }
    let mut args = Cli::try_parse_from(argv).unwrap().args;
    args.server = servers.split(',').map(str::to_owned).collect();
    args
}

/// An agent under test. Drop kills every engine process group it recorded.
pub struct TestAgent {
    pub handle: Option<AgentHandle>,
    pub data_dir: PathBuf,
    pub pids: Arc<Mutex<BTreeSet<u32>>>,
}

impl TestAgent {
    pub async fn start(args: AgentArgs) -> Self {
        let data_dir = args.data_dir.clone();
        let handle = flotilla_agent::start(args).await.expect("agent starts");
        TestAgent { handle: Some(handle), data_dir, pids: Arc::default() }
    }

    pub fn handle(&self) -> &AgentHandle {
        self.handle.as_ref().unwrap()
    }

    /// Current reports, remembering their pids for cleanup.
    pub fn reports(&self) -> Vec<pb::EngineReport> {
        let r = self.handle().reports();
        self.pids.lock().unwrap().extend(r.iter().map(|e| e.pid).filter(|p| *p > 0));
        r
    }

    pub async fn shutdown(&mut self, stop_engines: bool) {
        let _ = self.reports();
        if let Some(h) = self.handle.take() {
            let _ = h.shutdown(stop_engines).await;
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            self.pids.lock().unwrap().extend(h.reports().iter().map(|e| e.pid).filter(|p| *p > 0));
        }
        kill_groups(&self.pids.lock().unwrap(), &self.data_dir);
    }
}

/// SIGKILLs the process groups of `pids` and of every engine in the data dir's state file.
pub fn kill_groups(pids: &BTreeSet<u32>, data_dir: &Path) {
    let mut all = pids.clone();
    if let Ok(text) = std::fs::read_to_string(data_dir.join("engines.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            // `{"format": 2, "engines": {...}}`, or the bare map of version 1.
            if let Some(map) = v.get("engines").unwrap_or(&v).as_object() {
                all.extend(map.values().filter_map(|e| e["process"]["pid"].as_u64()).map(|p| p as u32));
            }
        }
    }
    for pid in all {
        signal_group(pid, Signal::KILL);
    }
}

/// Member `rank` of a two-node tp-pp gang with one GPU per node, joining `head_address`
/// (empty: not known yet).
pub fn two_node_gang(rank: u32, head_address: &str) -> pb::GangAssignment {
    pb::GangAssignment {
        size: 2,
        rank,
        layout: "tp-pp".into(),
        gpus_per_node: 1,
        head_address: head_address.into(),
        token: String::new(),
    }
}
