//! The Node actor: one per node. From the heartbeats the leader keeps in memory it derives
//! the node's state (Ready / NotReady / Cordoned / Draining / Drained) and writes it through
//! Raft when it changes; after `node_ttl + reschedule_grace` without a heartbeat it unbinds
//! the node's replicas (deletes them and frees their GPUs in one transaction), so their
//! models replace them elsewhere. It also records the GPU health the node's agent reports
//! (`status.gpu_health`, `unhealthy_gpus` = the Failed ones; [`crate::gpu_health`]),
//! logging and counting every GPU state change.
//!
//! ```text
//!  heartbeat (memory) ──> last_seen ─┐
//!  Node/Replica events ──────────────┼─> decide ─> Txn{ node status, delete lost replicas }
//!  Tick ─────────────────────────────┘
//! ```
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use flotilla_api::spec::{NodeState, ReplicaPhase};
use flotilla_api::{Kind, ObjectName};
use flotilla_storage::{Command, TxnOp};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use crate::config::ActorsConfig;
use crate::gpu_health::{self, GpuReport};
use crate::metrics::Controller;
use crate::objects::{key, release, txn, NodeView, ReplicaView};
use crate::shared::{lock, Ctx};
use crate::writes::execute;

/// What a node's decision sees.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub node: NodeView,
    /// Replicas bound to this node (any phase).
    pub replicas: BTreeMap<ObjectName, ReplicaView>,
    /// Last heartbeat, or the start of this leadership if none since.
    pub last_seen: Instant,
    /// The other nodes this node's gangs bind (their members' nodes), as stored.
    pub others: HashMap<ObjectName, NodeView>,
    /// Failed GPUs from the latest heartbeat, if one came.
    pub unhealthy_gpus: Option<Vec<u32>>,
    /// Not-Healthy GPUs with their evidence from the latest report, if one came.
    pub gpu_reports: Option<BTreeMap<u32, GpuReport>>,
    pub now: Instant,
    /// The wall clock now, Unix ms: stamps `last_transition_ms` for operators (decisions
    /// use `now`).
    pub wall_unix_ms: u64,
}

/// The state a node should have, and why.
pub fn node_state(f: &NodeFacts, cfg: &ActorsConfig) -> (NodeState, String) {
    let silent = f.now.saturating_duration_since(f.last_seen);
    if silent >= ActorsConfig::ms(cfg.node_ttl_ms) {
        return (NodeState::NotReady, format!("no heartbeat within the {} ms TTL", cfg.node_ttl_ms));
    }
    let spec = &f.node.spec;
    if spec.draining {
        let left = f.replicas.values().filter(|r| r.phase() != ReplicaPhase::Failed).count();
        if left == 0 {
            return (NodeState::Drained, String::new());
        }
        return (NodeState::Draining, format!("{left} replica(s) still on the node"));
    }
    if spec.cordoned {
        return (NodeState::Cordoned, String::new());
    }
    (NodeState::Ready, String::new())
}

/// The node's decision: at most one transaction.
pub fn decide(f: &NodeFacts, cfg: &ActorsConfig) -> Vec<Command> {
    let (state, reason) = node_state(f, cfg);
    let mut status = f.node.status.clone();
    if status.state != state || status.reason != reason {
        status.state = state;
        status.reason = reason;
        status.last_transition_ms = f.wall_unix_ms;
    }
    if let Some(u) = &f.unhealthy_gpus {
        status.unhealthy_gpus = u.clone();
    }
    if let Some(r) = &f.gpu_reports {
        status.gpu_health = gpu_health::record(&status.gpu_health, r, f.wall_unix_ms);
    }
    let mut compares = vec![f.node.compare()];
    let mut ops = Vec::new();
    let lost = f.now.saturating_duration_since(f.last_seen)
        >= ActorsConfig::ms(cfg.node_ttl_ms) + ActorsConfig::ms(cfg.reschedule_grace_ms);
    if lost {
        let gone: Vec<&ReplicaView> = f.replicas.values().filter(|r| r.phase() != ReplicaPhase::Failed).collect();
        let names: Vec<&ObjectName> = gone.iter().map(|r| &r.name).collect();
        release(&mut status, &names);
        for r in gone {
            compares.push(r.compare());
            // A gang whose other members still run elsewhere drains there first (their
            // agents stop them and free their GPUs, and the last one deletes it): freeing
            // GPUs under engines still running would let new ones start beside them.
            let running_elsewhere = r.held_elsewhere(&f.node.name, &f.others);
            if running_elsewhere.is_empty() || r.phase() == ReplicaPhase::Draining {
                compares.extend(running_elsewhere.iter().map(|v| v.compare()));
                if running_elsewhere.is_empty() {
                    ops.push(TxnOp::Delete { key: r.key() });
                }
                continue;
            }
            compares.extend(running_elsewhere.iter().map(|v| v.compare()));
            let rank = r.rank_on(&f.node.name).unwrap_or(0);
            let draining = flotilla_api::spec::ReplicaStatus {
                phase: ReplicaPhase::Draining,
                reason: format!("node {} (rank {rank} of the gang) was lost", f.node.name),
                endpoint: None,
                api_key: None,
                engine_cert_sha256: None,
                ..r.status.clone()
            };
            ops.push(r.status_op(&draining));
        }
    }
    if status != f.node.status {
        ops.insert(0, f.node.status_op(&status));
    }
    txn(compares, ops).into_iter().collect()
}

/// Logs and counts every GPU state change between two recorded `gpu_health` maps.
pub(crate) fn log_gpu_changes(
    ctx: &Ctx,
    node: &ObjectName,
    before: &BTreeMap<u32, flotilla_api::spec::GpuHealth>,
    after: &BTreeMap<u32, flotilla_api::spec::GpuHealth>,
) {
    for c in gpu_health::changes(before, after) {
        tracing::warn!(node = %node, gpu = c.gpu, from = %c.from, to = %c.to, evidence = ?c.evidence, "GPU health changed");
        ctx.metrics.gpu_health_changes.inc();
    }
}

/// Messages of a node actor.
#[derive(Debug, PartialEq)]
pub enum NodeMsg {
    /// The node (`None`) or a replica bound to it changed.
    Changed(Option<ObjectName>),
    /// A heartbeat arrived after a silence: re-evaluate now.
    Heard,
    Tick,
}

pub struct NodeActor;

pub struct NodeArgs {
    pub ctx: Arc<Ctx>,
    pub node: NodeView,
    pub replicas: Vec<ReplicaView>,
}

pub struct NodeActorState {
    ctx: Arc<Ctx>,
    node: NodeView,
    replicas: BTreeMap<ObjectName, ReplicaView>,
}

impl NodeActorState {
    fn refresh(&mut self, what: Option<ObjectName>) -> bool {
        let reader = self.ctx.handle.reader();
        match what {
            None => {
                let (o, _) = reader.get(&self.node.key());
                match o.and_then(|o| NodeView::from_stored(&o).ok()) {
                    Some(n) => self.node = n,
                    None => return false,
                }
            }
            Some(r) => {
                let (o, _) = reader.get(&key(Kind::Replica, &r));
                match o.and_then(|o| ReplicaView::from_stored(&o).ok()) {
                    Some(v) if v.binds(&self.node.name) => {
                        self.replicas.insert(r, v);
                    }
                    _ => {
                        self.replicas.remove(&r);
                    }
                }
            }
        }
        true
    }

    fn facts(&self) -> Option<NodeFacts> {
        let last_seen = self.ctx.last_seen(&self.node.name)?;
        let (unhealthy_gpus, gpu_reports) = match lock(&self.ctx.live).get(&self.node.name) {
            Some(l) => (Some(l.unhealthy_gpus.clone()), l.gpu_reports.clone()),
            None => (None, None),
        };
        let others = crate::facts::member_nodes(&self.ctx.handle.reader(), self.replicas.values(), &self.node.name);
        Some(NodeFacts {
            node: self.node.clone(),
            replicas: self.replicas.clone(),
            others,
            last_seen,
            unhealthy_gpus,
            gpu_reports,
            now: Instant::now(),
            wall_unix_ms: flotilla_api::civil::unix_ms(),
        })
    }
}

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = NodeActorState;
    type Arguments = NodeArgs;

    async fn pre_start(&self, myself: ActorRef<NodeMsg>, args: NodeArgs) -> Result<NodeActorState, ActorProcessingErr> {
        myself.send_interval(ActorsConfig::ms(args.ctx.config.reconcile_interval_ms), || NodeMsg::Tick);
        let replicas = args.replicas.into_iter().map(|r| (r.name.clone(), r)).collect();
        Ok(NodeActorState { ctx: args.ctx, node: args.node, replicas })
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        st: &mut NodeActorState,
    ) -> Result<(), ActorProcessingErr> {
        let evaluate = match msg {
            NodeMsg::Changed(what) => {
                if !st.refresh(what) {
                    tracing::info!(node = %st.node.name, "node deleted; actor stops");
                    myself.stop(None);
                    return Ok(());
                }
                // Replica changes matter only for drain completion; the tick covers the rest.
                st.node.spec.draining
            }
            NodeMsg::Heard | NodeMsg::Tick => true,
        };
        if !evaluate {
            return Ok(());
        }
        let Some(facts) = st.facts() else { return Ok(()) };
        let cmds = decide(&facts, &st.ctx.config);
        st.ctx.metrics.reconciled(Controller::Node);
        if cmds.is_empty() {
            return Ok(());
        }
        let lost: usize = match cmds.first() {
            Some(Command::Txn { ops, .. }) => ops.iter().filter(|o| matches!(o, TxnOp::Delete { .. })).count(),
            _ => 0,
        };
        let before = st.node.status.gpu_health.clone();
        let out = execute(&st.ctx, Controller::Node, cmds).await.map_err(|e| {
            tracing::warn!(node = %st.node.name, error = %e, "uncertain write; stopping for a rebuild");
            Box::new(e) as ActorProcessingErr
        })?;
        if out.applied > 0 && lost > 0 {
            tracing::warn!(node = %st.node.name, replicas = lost, "node lost; its replicas are unbound for rescheduling");
            st.ctx.metrics.replicas_rescheduled.inc_by(lost as u64);
            st.replicas.retain(|_, r| r.phase() == ReplicaPhase::Failed);
        }
        st.refresh(None);
        log_gpu_changes(&st.ctx, &st.node.name, &before, &st.node.status.gpu_health);
        Ok(())
    }
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
