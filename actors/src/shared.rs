//! State shared by the services and actors of one server, in memory only: the liveness of
//! agents (heartbeats, engine reports: high-rate signals that never go through Raft), the
//! assignment hub that tells each agent session its node's desired replicas, and the
//! handle of the running supervisor while this server leads.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_api::pb::{EngineReport, ReplicaAssignment};
use flotilla_api::ObjectName;
use flotilla_cluster::ClusterHandle;
use ractor::ActorRef;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::objects::ReplicaView;
use crate::supervisor::SupervisorMsg;
use crate::{ActorsConfig, ActorsError};

/// What the leader knows of one node's agent from its stream.
#[derive(Debug, Clone)]
pub struct NodeLive {
    pub agent_id: String,
    pub last_heartbeat: Instant,
    /// Latest engine report per replica name.
    pub engines: HashMap<String, EngineReport>,
    /// Failed GPU indices from the latest heartbeat.
    pub unhealthy_gpus: Vec<u32>,
    /// GPUs reported not Healthy by the latest registration or heartbeat (`None`: no report).
    pub gpu_reports: Option<BTreeMap<u32, crate::gpu_health::GpuReport>>,
    /// Whether a stream from this agent is open now.
    pub connected: bool,
}

impl NodeLive {
    /// A node first heard from `agent_id` at `now`, with its stream open.
    pub fn new(agent_id: &str, now: Instant) -> NodeLive {
        NodeLive {
            agent_id: agent_id.to_owned(),
            last_heartbeat: now,
            engines: HashMap::new(),
            unhealthy_gpus: Vec::new(),
            gpu_reports: None,
            connected: true,
        }
    }
}

/// One gateway's latest in-flight counts (`ReportUsage`): the (adapter, replica) pairs
/// with requests in flight, and when it reported them. A gateway's report replaces its
/// previous one; one silent for [`FLIGHTS_TTL`] counts no more (it died or lost us).
#[derive(Debug, Clone, Default)]
pub struct GatewayFlights {
    pub at: Option<Instant>,
    pub pairs: BTreeSet<(ObjectName, ObjectName)>,
}

/// A gateway reports at least every 2 s while requests are in flight; after this without
/// a report its counts are dropped.
pub const FLIGHTS_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// The adapter controllers' latest verdicts on demands they could not place, per adapter:
/// when decided and why. `EnsureLoaded` waits on this to answer at once.
pub type UnplacedBook = HashMap<ObjectName, (Instant, crate::adapters::Unplaced)>;

/// Locks a mutex, recovering from poisoning (the data are plain maps, valid after a panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resolves when `leading` turns false (or its sender is gone).
pub(crate) async fn lost(leading: &mut watch::Receiver<bool>) {
    loop {
        let still = *leading.borrow_and_update();
        if !still || leading.changed().await.is_err() {
            return;
        }
    }
}

/// Everything one server's controllers and services share.
pub struct Ctx {
    pub handle: ClusterHandle,
    pub config: ActorsConfig,
    pub live: Mutex<HashMap<ObjectName, NodeLive>>,
    pub hub: Hub,
    pub metrics: Metrics,
    /// The instant this server became leader (and its controllers started), while it leads.
    pub(crate) leading: Mutex<Option<Instant>>,
    /// The running supervisor, while this server leads.
    pub(crate) supervisor: Mutex<Option<ActorRef<SupervisorMsg>>>,
    /// When a gateway last routed a request for (adapter, replica), from `ReportUsage`.
    pub adapter_usage: Mutex<HashMap<(ObjectName, ObjectName), Instant>>,
    /// In-flight (adapter, replica) pairs per gateway id, from `ReportUsage` (a watch:
    /// `EnsureLoaded` calls waiting for a slot held by requests in flight re-ask on change).
    pub adapter_flights: watch::Sender<HashMap<String, GatewayFlights>>,
    /// Demands the adapter controllers could not place (see [`UnplacedBook`]).
    pub adapter_unplaced: watch::Sender<UnplacedBook>,
    /// Bumped on every heartbeat received (waiters re-check engine reports).
    pub beats: watch::Sender<u64>,
    /// The gateways' latest demand reports, per model (autoscaler input).
    pub demand: Mutex<crate::autoscale::service::DemandBook>,
    /// What the gateways saw per template, per model (canary analysis input).
    pub canary: Mutex<crate::canary::CanaryBook>,
}

impl Ctx {
    pub fn new(handle: ClusterHandle, config: ActorsConfig) -> Arc<Ctx> {
        Arc::new(Ctx {
            handle,
            config,
            live: Mutex::new(HashMap::new()),
            hub: Hub::default(),
            metrics: Metrics::default(),
            leading: Mutex::new(None),
            supervisor: Mutex::new(None),
            adapter_usage: Mutex::new(HashMap::new()),
            adapter_flights: watch::channel(HashMap::new()).0,
            adapter_unplaced: watch::channel(HashMap::new()).0,
            beats: watch::channel(0).0,
            demand: Mutex::new(Default::default()),
            canary: Mutex::new(Default::default()),
        })
    }

    /// `Ok` while this server leads and its controllers run; otherwise the error that
    /// sends clients to the leader.
    pub fn ensure_leader(&self) -> Result<(), ActorsError> {
        if lock(&self.leading).is_some() && self.handle.is_leader() {
            return Ok(());
        }
        match self.handle.leader_addr() {
            Some(addr) if !self.handle.is_leader() => Err(ActorsError::NotLeader(addr)),
            _ => Err(ActorsError::NoLeader),
        }
    }

    pub(crate) fn supervisor(&self) -> Option<ActorRef<SupervisorMsg>> {
        lock(&self.supervisor).clone()
    }

    /// When this server became leader (the start of every node's TTL after a failover).
    pub fn leader_since(&self) -> Option<Instant> {
        *lock(&self.leading)
    }

    /// Records a heartbeat from `node` without a stream or engine reports: the entry point
    /// of in-process agents (benchmarks). Real agents go through `AgentService`.
    pub fn record_heartbeat(&self, node: &ObjectName, agent_id: &str) {
        let now = Instant::now();
        let mut live = lock(&self.live);
        let l = live.entry(node.clone()).or_insert_with(|| NodeLive::new(agent_id, now));
        l.last_heartbeat = now;
    }

    /// The last time `node` was heard from, or the start of this leadership if never.
    pub fn last_seen(&self, node: &ObjectName) -> Option<Instant> {
        let since = self.leader_since()?;
        Some(lock(&self.live).get(node).map_or(since, |l| l.last_heartbeat.max(since)))
    }
}

/// The desired replicas of every node, as `Assign` carries them, published per node.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<HubInner>,
    ready: Mutex<Option<watch::Sender<bool>>>,
}

#[derive(Default)]
struct HubInner {
    /// replica → the nodes it is assigned to (one; a gang's every member's).
    placed: HashMap<ObjectName, Vec<ObjectName>>,
    nodes: HashMap<ObjectName, NodeAssign>,
    /// node → its Draining replicas (deleted once no agent runs them any more).
    draining: HashMap<ObjectName, BTreeSet<ObjectName>>,
    /// replica → the nodes it drains on.
    draining_on: HashMap<ObjectName, Vec<ObjectName>>,
}

impl HubInner {
    /// Moves `name` to where `replica` says; returns the nodes whose desired set changed.
    fn track(&mut self, name: &ObjectName, replica: Option<&ReplicaView>) -> Vec<ObjectName> {
        let mut touched = Vec::new();
        for old in self.placed.remove(name).unwrap_or_default() {
            if let Some(n) = self.nodes.get_mut(&old) {
                n.replicas.remove(name);
            }
            touched.push(old);
        }
        for old in self.draining_on.remove(name).unwrap_or_default() {
            if let Some(set) = self.draining.get_mut(&old) {
                set.remove(name);
            }
        }
        let Some(r) = replica.filter(|r| r.spec.node.is_some()) else { return touched };
        let nodes: Vec<ObjectName> = r.spec.bindings().into_iter().map(|(n, _)| n.clone()).collect();
        if r.assigned() {
            for (rank, node) in nodes.iter().enumerate() {
                let a = assignment(r, rank);
                self.nodes.entry(node.clone()).or_insert_with(NodeAssign::new).replicas.insert(name.clone(), a);
                touched.push(node.clone());
            }
            self.placed.insert(name.clone(), nodes);
        } else if r.phase() == flotilla_api::spec::ReplicaPhase::Draining {
            for node in &nodes {
                self.draining.entry(node.clone()).or_default().insert(name.clone());
            }
            self.draining_on.insert(name.clone(), nodes);
        }
        touched
    }
}

struct NodeAssign {
    replicas: BTreeMap<ObjectName, ReplicaAssignment>,
    tx: watch::Sender<Arc<Vec<ReplicaAssignment>>>,
}

impl NodeAssign {
    fn new() -> NodeAssign {
        NodeAssign { replicas: BTreeMap::new(), tx: watch::channel(Arc::new(Vec::new())).0 }
    }
}

/// What the agent of `r`'s member `rank` runs (rank 0 for a one-node replica). A gang's
/// members share the replica's name and each get their own node's GPUs; a worker gets the
/// head's rendezvous address once the head's agent has reported it.
fn assignment(r: &ReplicaView, rank: usize) -> ReplicaAssignment {
    let gang =
        r.spec.topology.as_ref().filter(|_| !r.spec.members.is_empty()).map(|t| flotilla_api::pb::GangAssignment {
            size: t.nodes,
            rank: rank as u32,
            layout: t.layout.as_str().to_owned(),
            gpus_per_node: t.gpus_per_node,
            head_address: if rank == 0 { String::new() } else { r.status.rendezvous.clone().unwrap_or_default() },
            token: if rank == 0 { String::new() } else { r.status.gang_token.clone().unwrap_or_default() },
        });
    let gpus = match r.spec.members.get(rank) {
        Some(m) => m.gpus.clone(),
        None => r.spec.gpus.clone(),
    };
    ReplicaAssignment {
        replica: r.name.to_string(),
        model: r.spec.model.to_string(),
        engine: match r.spec.engine {
            flotilla_api::spec::EngineKind::Sim => "sim".into(),
            flotilla_api::spec::EngineKind::Vllm => "vllm".into(),
        },
        source: r.spec.source.clone(),
        engine_args: r.spec.engine_args.clone(),
        gpus,
        engine_image: r.spec.engine_image.clone().unwrap_or_default(),
        // adapters are loaded through the API, which only the head serves
        adapters: match rank {
            0 => r
                .spec
                .adapters
                .iter()
                .map(|a| flotilla_api::pb::AdapterAssignment { name: a.name.to_string(), source: a.source.clone() })
                .collect(),
            _ => Vec::new(),
        },
        traceparent: r.labels.get(crate::objects::TRACE_LABEL).cloned().unwrap_or_default(),
        gang,
        kv_transfer: r.spec.kv_transfer.as_ref().map(|k| flotilla_api::pb::KvTransferAssignment {
            // the spec's kebab-case names (serde), which the agent parses back
            connector: match k.connector {
                flotilla_api::spec::KvConnector::Nixl => "nixl",
                flotilla_api::spec::KvConnector::Lmcache => "lmcache",
                flotilla_api::spec::KvConnector::P2pNccl => "p2p-nccl",
            }
            .to_owned(),
            role: k.role.as_str().to_owned(),
        }),
    }
}

impl Hub {
    fn ready_tx(&self) -> watch::Sender<bool> {
        lock(&self.ready).get_or_insert_with(|| watch::channel(false).0).clone()
    }

    /// Resolves once the hub holds the leader's full view (never send an empty `Assign`
    /// before that: the agent would stop every engine).
    pub async fn wait_ready(&self) {
        let mut rx = self.ready_tx().subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Replaces everything with the assignments of `replicas`, then marks the hub ready.
    pub fn reset(&self, replicas: &[ReplicaView]) {
        {
            let mut inner = lock(&self.inner);
            inner.placed.clear();
            for n in inner.nodes.values_mut() {
                n.replicas.clear();
            }
            inner.draining.clear();
            inner.draining_on.clear();
            for r in replicas {
                inner.track(&r.name, Some(r));
            }
            for n in inner.nodes.values() {
                n.tx.send_replace(Arc::new(n.replicas.values().cloned().collect()));
            }
        }
        self.ready_tx().send_replace(true);
    }

    /// Marks the hub stale (leadership lost).
    pub fn clear(&self) {
        self.ready_tx().send_replace(false);
    }

    /// Records the new state of one replica (`None`: deleted).
    pub fn update(&self, name: &ObjectName, replica: Option<&ReplicaView>) {
        let mut inner = lock(&self.inner);
        let mut touched = inner.track(name, replica);
        touched.dedup();
        for node in touched {
            if let Some(n) = inner.nodes.get(&node) {
                let next: Vec<ReplicaAssignment> = n.replicas.values().cloned().collect();
                n.tx.send_if_modified(|cur| {
                    let changed = **cur != next;
                    if changed {
                        *cur = Arc::new(next);
                    }
                    changed
                });
            }
        }
    }

    /// The Draining replicas bound to `node`.
    pub fn draining(&self, node: &ObjectName) -> Vec<ObjectName> {
        lock(&self.inner).draining.get(node).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// The desired set of `node`, following changes.
    pub fn subscribe(&self, node: &ObjectName) -> watch::Receiver<Arc<Vec<ReplicaAssignment>>> {
        lock(&self.inner).nodes.entry(node.clone()).or_insert_with(NodeAssign::new).tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{name, World};
    use flotilla_api::spec::ReplicaPhase;

    #[test]
    fn each_member_of_a_gang_is_assigned_to_its_node_and_workers_wait_for_the_head() {
        let mut w = World::default();
        for n in ["a", "b"] {
            w.node(n, 4, "A");
        }
        w.gang("g-1", "m", ReplicaPhase::Scheduled, &[("a", vec![0, 1]), ("b", vec![2, 3])]);
        let hub = Hub::default();
        let (a, b) = (hub.subscribe(&name("a")), hub.subscribe(&name("b")));
        hub.update(&name("g-1"), w.replicas().first());
        let (head, worker) = (a.borrow()[0].clone(), b.borrow()[0].clone());
        assert_eq!((head.replica.as_str(), head.gpus.clone()), ("g-1", vec![0, 1]));
        assert_eq!(worker.gpus, vec![2, 3]);
        let (hg, wg) = (head.gang.unwrap(), worker.gang.clone().unwrap());
        assert_eq!((hg.size, hg.rank, hg.layout.as_str(), hg.gpus_per_node), (2, 0, "tp-pp", 2));
        assert_eq!((wg.rank, wg.head_address.as_str()), (1, ""), "the head has not reported yet");
        // the head's rendezvous reaches the worker's assignment (the head's own is unchanged)
        w.replicas_mut("g-1", |_, st| {
            st.rendezvous = Some("10.0.0.1:29500".into());
            st.gang_token = Some("ab".repeat(32));
        });
        hub.update(&name("g-1"), w.replicas().first());
        let wg = b.borrow()[0].gang.clone().unwrap();
        assert_eq!((wg.head_address.as_str(), wg.token), ("10.0.0.1:29500", "ab".repeat(32)), "with the gang's token");
        let hg = a.borrow()[0].gang.clone().unwrap();
        assert_eq!((hg.head_address.as_str(), hg.token.as_str()), ("", ""), "the head made the token itself");
        // draining: no member runs it any more, and both nodes list it for deletion
        w.replicas_mut("g-1", |_, st| st.phase = ReplicaPhase::Draining);
        hub.update(&name("g-1"), w.replicas().first());
        assert!(a.borrow().is_empty() && b.borrow().is_empty());
        assert_eq!((hub.draining(&name("a")), hub.draining(&name("b"))), (vec![name("g-1")], vec![name("g-1")]));
        hub.update(&name("g-1"), None);
        assert!(hub.draining(&name("b")).is_empty());
    }
}
