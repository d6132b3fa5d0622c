//! Test support: an in-process cluster of real servers running the controllers (copied from
//! flotilla-tests' `TestCluster`, with the actors' extensions), fake agents that speak the
//! real AgentService protocol over gRPC, and object API helpers.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_actors::{extensions_with_probe, ActorsConfig, Probe};
use flotilla_api::pb::agent_message::Msg as AgentMsg;
use flotilla_api::pb::agent_service_client::AgentServiceClient;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::server_message::Msg as ServerMsg;
use flotilla_api::pb::{
    AgentMessage, ApplyRequest, DeleteRequest, EngineReport, GetRequest, GpuInfo, Heartbeat, ListRequest, Object,
    Register, ReplicaAssignment,
};
use flotilla_cluster::{ServerConfig, ServerHandle};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub fn actors_config() -> ActorsConfig {
    ActorsConfig {
        // Generous enough that a loaded 2-core CI machine does not miss six heartbeats in a
        // row and declare a healthy fake node lost.
        node_ttl_ms: 2_000,
        reschedule_grace_ms: 1_500,
        heartbeat_interval_ms: 100,
        reconcile_interval_ms: 100,
        endpoints_refresh_ms: 500,
        restart_delay_ms: 50,
        ..ActorsConfig::default()
    }
}

pub struct Cluster {
    dir: TempDir,
    pub servers: Vec<Option<ServerHandle>>,
    pub probes: Vec<Probe>,
    pub addrs: Vec<SocketAddr>,
}

impl Cluster {
    pub async fn start(n: usize) -> Cluster {
        let mut c = Cluster { dir: TempDir::new().expect("tmp"), servers: vec![], probes: vec![], addrs: vec![] };
        for id in 1..=n as u64 {
            let mut config = ServerConfig {
                grpc_addr: "127.0.0.1:0".parse().expect("addr"),
                http_addr: "127.0.0.1:0".parse().expect("addr"),
                bootstrap: id == 1,
                join: if id == 1 { None } else { Some(c.addrs[0].to_string()) },
                ..ServerConfig::new(id, c.dir.path().join(format!("server-{id}")))
            };
            config.heartbeat_ms = 50;
            config.election_timeout_min_ms = 200;
            config.election_timeout_max_ms = 400;
            config.request_timeout = Duration::from_secs(5);
            let (ext, probe) = extensions_with_probe(actors_config());
            let h = flotilla_cluster::start_with(config, ext).await.expect("server starts");
            c.addrs.push(h.grpc_addr);
            c.servers.push(Some(h));
            c.probes.push(probe);
        }
        wait_until("all voters and a leader", Duration::from_secs(20), || async {
            let Some(h) = c.servers[0].as_ref() else { return false };
            let m = h.raft().metrics().borrow().clone();
            m.current_leader.is_some() && m.membership_config.voter_ids().count() == n
        })
        .await;
        c
    }

    /// The leader's ID, once one leads and runs its controllers.
    pub async fn leader(&self) -> u64 {
        let mut found = 0;
        wait_until("a leader running controllers", Duration::from_secs(20), || {
            let found = &mut found;
            let r = self.probes.iter().zip(&self.servers).enumerate().find_map(|(i, (p, s))| {
                let ctx = p.ctx()?;
                (s.is_some() && ctx.ensure_leader().is_ok()).then_some(i as u64 + 1)
            });
            *found = r.unwrap_or(0);
            async move { r.is_some() }
        })
        .await;
        found
    }

    pub async fn stop(&mut self, id: u64) {
        if let Some(h) = self.servers[id as usize - 1].take() {
            h.shutdown().await;
        }
    }

    pub fn live_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.iter().zip(&self.servers).filter(|(_, s)| s.is_some()).map(|(a, _)| *a).collect()
    }

    pub async fn objects(&self) -> ObjectServiceClient<Channel> {
        let addr = self.live_addrs()[0];
        ObjectServiceClient::new(channel(addr))
    }

    pub async fn apply(&self, manifest: &str) {
        self.objects()
            .await
            .apply(ApplyRequest { manifest: manifest.into(), expected_revision: None })
            .await
            .expect("apply");
    }

    pub async fn delete(&self, kind: &str, name: &str) {
        self.objects()
            .await
            .delete(DeleteRequest { kind: kind.into(), name: name.into(), expected_revision: None })
            .await
            .expect("delete");
    }

    pub async fn list(&self, kind: &str) -> Vec<Object> {
        let req = ListRequest { kind: kind.into(), label_selector: String::new(), stale: false };
        match self.objects().await.list(req).await {
            Ok(r) => r.into_inner().objects,
            Err(_) => Vec::new(),
        }
    }

    pub async fn get(&self, kind: &str, name: &str) -> Option<Object> {
        let req = GetRequest { kind: kind.into(), name: name.into(), stale: false };
        self.objects().await.get(req).await.ok().and_then(|r| r.into_inner().object)
    }

    pub async fn shutdown(mut self) {
        for id in 1..=self.servers.len() as u64 {
            self.stop(id).await;
        }
    }
}

pub fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or(serde_json::Value::Null)
}

/// Polls `f` every 50 ms until it holds, or panics naming `what`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn model(name: &str, replicas: u32, gpus: u32) -> String {
    format!("kind: Model\nmetadata:\n  name: {name}\nspec:\n  engine: sim\n  source: file:///models/{name}\n  replicas: {replicas}\n  gpus: {gpus}\n")
}

/// Replicas (name → (phase, node)) from the object API.
pub async fn replicas(c: &Cluster) -> BTreeMap<String, (String, String)> {
    c.list("Replica")
        .await
        .into_iter()
        .map(|o| {
            let spec = json(&o.spec_json);
            let status = json(&o.status_json);
            let phase = status["phase"].as_str().unwrap_or("Pending").to_owned();
            (o.name, (phase, spec["node"].as_str().unwrap_or("").to_owned()))
        })
        .collect()
}

pub async fn ready_count(c: &Cluster) -> usize {
    replicas(c).await.values().filter(|(p, _)| p == "Ready").count()
}

/// A fake agent: registers `gpus` GPUs, reports every assigned replica ready.
pub struct FakeAgent {
    pub name: String,
    pub assigned: Arc<Mutex<Vec<ReplicaAssignment>>>,
    pub errors: Arc<Mutex<Vec<tonic::Status>>>,
    task: JoinHandle<()>,
}

impl FakeAgent {
    pub fn start(addrs: Vec<SocketAddr>, name: &str, gpus: u32) -> FakeAgent {
        Self::start_as(addrs, name, &format!("agent-{name}"), gpus)
    }

    pub fn start_as(addrs: Vec<SocketAddr>, name: &str, agent_id: &str, gpus: u32) -> FakeAgent {
        let assigned = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (a, e, n, id) = (assigned.clone(), errors.clone(), name.to_owned(), agent_id.to_owned());
        let task = tokio::spawn(async move {
            let mut i = 0usize;
            let mut target: Option<String> = None;
            loop {
                let addr = target.take().unwrap_or_else(|| addrs[i % addrs.len()].to_string());
                i += 1;
                if let Err(status) = run_agent(&addr, &n, &id, gpus, &a).await {
                    if let Some(l) = status.message().split("leader=").nth(1) {
                        target = Some(l.trim().to_owned());
                    }
                    e.lock().expect("lock").push(status);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        FakeAgent { name: name.into(), assigned, errors, task }
    }

    /// Simulates the machine dying: no more heartbeats, stream closed.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_agent(
    addr: &str,
    name: &str,
    agent_id: &str,
    gpus: u32,
    assigned: &Mutex<Vec<ReplicaAssignment>>,
) -> Result<(), tonic::Status> {
    let mut client = AgentServiceClient::new(channel(addr.parse().map_err(|_| tonic::Status::internal("bad addr"))?));
    let (tx, rx) = mpsc::channel(16);
    let reg = Register {
        node_name: name.into(),
        agent_id: agent_id.into(),
        address: "127.0.0.1".into(),
        labels: Default::default(),
        gpus: (0..gpus)
            .map(|i| GpuInfo {
                index: i,
                gpu_type: "H100-80GB".into(),
                memory_mib: 81_920,
                healthy: true,
                health_reason: String::new(),
            })
            .collect(),
        version: "test".into(),
    };
    let _ = tx.send(AgentMessage { msg: Some(AgentMsg::Register(reg)) }).await;
    let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            m = inbound.message() => match m? {
                Some(m) => if let Some(ServerMsg::Assign(a)) = m.msg {
                    *assigned.lock().expect("lock") = a.replicas;
                },
                None => return Ok(()),
            },
            _ = tick.tick() => {
                let engines = assigned
                    .lock()
                    .expect("lock")
                    .iter()
                    .enumerate()
                    .map(|(i, a)| EngineReport { replica: a.replica.clone(), state: "ready".into(), endpoint: format!("127.0.0.1:{}", 20_000 + i), num_requests_running: 1.0, ..Default::default() })
                    .collect();
                if tx.send(AgentMessage { msg: Some(AgentMsg::Heartbeat(Heartbeat { engines, gpus: vec![] })) }).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}
