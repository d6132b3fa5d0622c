//! Test support: an in-process cluster of real servers running the controllers (the shared
//! `TestCluster` with the actors' extensions), fake agents that speak the real AgentService
//! protocol over gRPC, and replica readers.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_actors::{extensions_with_probe, ActorsConfig, Probe};
use flotilla_api::pb::agent_message::Msg as AgentMsg;
use flotilla_api::pb::agent_service_client::AgentServiceClient;
use flotilla_api::pb::server_message::Msg as ServerMsg;
use flotilla_api::pb::{AgentMessage, EngineReport, GpuInfo, Heartbeat, Register, ReplicaAssignment};
pub use flotilla_testkit::cluster::{channel, fast, TestCluster};
pub use flotilla_testkit::manifests::model_manifest;
pub use flotilla_testkit::wait::wait_until;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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

/// An in-process cluster whose servers run the controllers, each with a [`Probe`] into
/// its actors' context.
pub struct Cluster {
    inner: TestCluster,
    probes: Arc<Mutex<Vec<Option<Probe>>>>,
}

impl std::ops::Deref for Cluster {
    type Target = TestCluster;
    fn deref(&self) -> &TestCluster {
        &self.inner
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut TestCluster {
        &mut self.inner
    }
}

impl Cluster {
    pub async fn start(n: usize) -> Cluster {
        let probes: Arc<Mutex<Vec<Option<Probe>>>> = Arc::default();
        let slots = probes.clone();
        let extensions = Box::new(move |id: u64| {
            let (ext, probe) = extensions_with_probe(actors_config());
            let mut slots = slots.lock().expect("probes lock");
            let i = id as usize - 1;
            if slots.len() <= i {
                slots.resize_with(i + 1, || None);
            }
            slots[i] = Some(probe);
            ext
        });
        let inner = TestCluster::start_with(n, fast, extensions).await;
        Cluster { inner, probes }
    }

    /// The leader's ID, once one leads and runs its controllers.
    pub async fn leader(&self) -> u64 {
        let mut found = 0;
        wait_until("a leader running controllers", Duration::from_secs(20), || {
            let found = &mut found;
            let r = self.probes.lock().expect("probes lock").iter().enumerate().find_map(|(i, p)| {
                let ctx = p.as_ref()?.ctx()?;
                let id = i as u64 + 1;
                (self.is_running(id) && ctx.ensure_leader().is_ok()).then_some(id)
            });
            *found = r.unwrap_or(0);
            async move { r.is_some() }
        })
        .await;
        found
    }

    /// The controllers' context on server `id`, once it has one.
    pub fn ctx(&self, id: u64) -> Option<Arc<flotilla_actors::shared::Ctx>> {
        self.probes.lock().expect("probes lock").get(id as usize - 1)?.as_ref()?.ctx()
    }

    pub async fn shutdown(self) {
        self.inner.shutdown().await;
    }
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or(serde_json::Value::Null)
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
    /// The GPUs every heartbeat reports (empty: none, as before GPU health existed).
    pub gpus: Arc<Mutex<Vec<GpuInfo>>>,
    task: JoinHandle<()>,
}

impl FakeAgent {
    pub fn start(addrs: Vec<SocketAddr>, name: &str, gpus: u32) -> FakeAgent {
        Self::start_as(addrs, name, &format!("agent-{name}"), gpus)
    }

    pub fn start_as(addrs: Vec<SocketAddr>, name: &str, agent_id: &str, gpus: u32) -> FakeAgent {
        Self::start_reporting(addrs, name, agent_id, gpus, "127.0.0.1")
    }

    /// An agent that reports its engines at `endpoint_host` (a lying agent: another host
    /// than the loopback it connects from).
    pub fn start_reporting(
        addrs: Vec<SocketAddr>,
        name: &str,
        agent_id: &str,
        gpus: u32,
        endpoint_host: &str,
    ) -> FakeAgent {
        let assigned = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let reported = Arc::new(Mutex::new(Vec::new()));
        let (a, e, n, id) = (assigned.clone(), errors.clone(), name.to_owned(), agent_id.to_owned());
        let g = reported.clone();
        let host = endpoint_host.to_owned();
        let task = tokio::spawn(async move {
            let mut i = 0usize;
            let mut target: Option<String> = None;
            loop {
                let addr = target.take().unwrap_or_else(|| addrs[i % addrs.len()].to_string());
                i += 1;
                if let Err(status) = run_agent(&addr, &n, &id, gpus, &host, &a, &g).await {
                    if let Some(l) = status.message().split("leader=").nth(1) {
                        target = Some(l.trim().to_owned());
                    }
                    e.lock().expect("lock").push(status);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        FakeAgent { name: name.into(), assigned, errors, gpus: reported, task }
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
    endpoint_host: &str,
    assigned: &Mutex<Vec<ReplicaAssignment>>,
    reported: &Mutex<Vec<GpuInfo>>,
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
                ..Default::default()
            })
            .collect(),
        version: "test".into(),
        engine_ports: None,
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
                    .map(|(i, a)| EngineReport { replica: a.replica.clone(), state: "ready".into(), endpoint: format!("{endpoint_host}:{}", 20_000 + i), num_requests_running: 1.0, ..Default::default() })
                    .collect();
                let gpus = reported.lock().expect("lock").clone();
                if tx.send(AgentMessage { msg: Some(AgentMsg::Heartbeat(Heartbeat { engines, gpus })) }).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}
