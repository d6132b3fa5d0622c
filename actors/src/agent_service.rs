//! `AgentService`: one bidirectional stream per agent, served by the leader. The agent sends
//! `Register` (the Node object is created or updated through Raft; a name held by another
//! live agent is refused with ALREADY_EXISTS), then heartbeats (kept in memory; only
//! changes of replica phase go through Raft). The server answers `Registered`, then an
//! `Assign` with the node's full desired set whenever it changes. Registrations and
//! heartbeats are held to [`crate::agent_bounds`] first (engines only on the agent's own
//! address and ports, bounded sizes): one out of bounds is refused with INVALID_ARGUMENT
//! and nothing of it is kept or written.
//!
//! ```text
//!  agent ──Register──> register(): Txn Put Node ──> Registered, Assign(full set)
//!  agent ──Heartbeat─> live memory ─> heartbeat_txn(): phase changes, Draining deleted
//!  hub(node) changed ────────────────────────────────> Assign(full set)
//! ```
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::pb::agent_message::Msg as AgentMsg;
use flotilla_api::pb::agent_service_server::AgentService;
use flotilla_api::pb::server_message::Msg as ServerMsg;
use flotilla_api::pb::{AgentMessage, Assign, Heartbeat, Register, Registered, ServerMessage};
use flotilla_api::spec::{Gpu, NodeSpec, NodeState, NodeStatus};
use flotilla_api::{Kind, ObjectName};
use flotilla_storage::{Command, Compare, TxnOp};
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::agent_bounds::{check_heartbeat, check_registration, AgentScope};
use crate::metrics::Controller;
use crate::objects::{key, NodeView, ReplicaView};
use crate::reports::heartbeat_txn;
use crate::shared::{lock, Ctx, NodeLive};
use crate::supervisor::SupervisorMsg;
use crate::writes::execute;
use crate::ActorsError;

/// How long the server waits for `Register` on a new stream.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AgentServiceImpl {
    pub(crate) ctx: Arc<Ctx>,
}

type Out = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentServiceImpl {
    type SessionStream = Out;

    async fn session(&self, req: Request<Streaming<AgentMessage>>) -> Result<Response<Out>, Status> {
        self.ctx.ensure_leader()?;
        let caller = req.extensions().get::<flotilla_security::Caller>().and_then(|c| c.0.clone());
        let peer = req.remote_addr().map(|a| a.ip());
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("actors.register_timeout: no Register within 10 s"))??;
        let Some(AgentMessage { msg: Some(AgentMsg::Register(mut reg)) }) = first else {
            return Err(ActorsError::InvalidArgument("the first message on the stream must be Register".into()).into());
        };
        check_identity(caller.as_ref(), &reg.node_name)?;
        let scope = check_registration(&mut reg, peer)
            .inspect_err(|e| tracing::warn!(peer = ?peer, error = %e, "agent registration refused"))?;
        let node = register(&self.ctx, &reg).await?;
        let (tx, rx) = mpsc::channel(16);
        let registered =
            Registered { node_name: node.to_string(), heartbeat_interval_ms: self.ctx.config.heartbeat_interval_ms };
        let _ = tx.send(Ok(ServerMessage { msg: Some(ServerMsg::Registered(registered)) })).await;
        tokio::spawn(run_session(self.ctx.clone(), node, reg.agent_id, scope, inbound, tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// With security on, an agent's certificate names its node: it may open that node's session
/// and no other (a stolen certificate of one node cannot impersonate another).
pub fn check_identity(caller: Option<&flotilla_security::Identity>, node_name: &str) -> Result<(), Status> {
    match caller {
        None => Ok(()),
        Some(id) if id.role == flotilla_security::Role::Agent && id.name == node_name => Ok(()),
        Some(id) => Err(Status::permission_denied(format!(
            "{id} may not open the session of node {node_name:?}: an agent's certificate must name its node \
             (spiffe://flotilla/agent/{node_name})"
        ))),
    }
}

/// Checks a registration against the store and the live agents.
/// A node known only from the store (no live agent) may be taken over by a new agent.
pub fn check_register(
    reg: &Register,
    live: Option<&NodeLive>,
    ttl: Duration,
    now: Instant,
) -> Result<ObjectName, ActorsError> {
    let name: ObjectName = reg
        .node_name
        .parse()
        .map_err(|e: flotilla_api::ApiError| ActorsError::InvalidArgument(format!("node_name: {e}")))?;
    if reg.agent_id.trim().is_empty() {
        return Err(ActorsError::InvalidArgument("agent_id is empty".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for g in &reg.gpus {
        if !seen.insert(g.index) {
            return Err(ActorsError::InvalidArgument(format!("gpus: index {} is listed twice", g.index)));
        }
    }
    if let Some(l) = live {
        let age = now.saturating_duration_since(l.last_heartbeat);
        if l.agent_id != reg.agent_id && age < ttl {
            return Err(ActorsError::NodeNameTaken {
                node: name.to_string(),
                agent_id: l.agent_id.clone(),
                age_ms: age.as_millis() as u64,
            });
        }
    }
    Ok(name)
}

/// The Node object after a registration: spec from the agent, cordon/drain and allocations kept.
/// `wall_ms` stamps GPU health changes (`since_ms`).
pub fn registered_node(reg: &Register, existing: Option<&NodeView>, wall_ms: u64) -> (NodeSpec, NodeStatus) {
    let spec = NodeSpec {
        address: reg.address.clone(),
        gpus: reg
            .gpus
            .iter()
            .map(|g| Gpu { index: g.index, gpu_type: g.gpu_type.clone(), memory_mib: g.memory_mib })
            .collect(),
        agent_id: reg.agent_id.clone(),
        cordoned: existing.is_some_and(|n| n.spec.cordoned),
        draining: existing.is_some_and(|n| n.spec.draining),
    };
    let mut status = existing.map(|n| n.status.clone()).unwrap_or_default();
    let reports = crate::gpu_health::reports(&reg.gpus);
    status.unhealthy_gpus = crate::gpu_health::failed(&reports);
    status.gpu_health = crate::gpu_health::record(&status.gpu_health, &reports, wall_ms);
    status.state = if spec.draining {
        NodeState::Draining
    } else if spec.cordoned {
        NodeState::Cordoned
    } else {
        NodeState::Ready
    };
    status.reason.clear();
    (spec, status)
}

async fn register(ctx: &Arc<Ctx>, reg: &Register) -> Result<ObjectName, ActorsError> {
    let ttl = Duration::from_millis(ctx.config.node_ttl_ms);
    for _ in 0..5 {
        let name: ObjectName = reg
            .node_name
            .parse()
            .map_err(|e: flotilla_api::ApiError| ActorsError::InvalidArgument(format!("node_name: {e}")))?;
        let (o, _) = ctx.handle.reader().get(&key(Kind::Node, &name));
        let existing = o.as_ref().map(NodeView::from_stored).transpose()?;
        let live = lock(&ctx.live).get(&name).cloned();
        let name = check_register(reg, live.as_ref(), ttl, Instant::now())?;
        let wall_ms = flotilla_api::civil::unix_ms();
        let (spec, status) = registered_node(reg, existing.as_ref(), wall_ms);
        let op = TxnOp::Put {
            key: key(Kind::Node, &name),
            uid: o.as_ref().map_or_else(|| uuid::Uuid::new_v4().to_string(), |o| o.uid.clone()),
            labels: reg.labels.clone().into_iter().collect(),
            spec: serde_json::to_value(&spec).unwrap_or_default(),
            status: Some(serde_json::to_value(&status).unwrap_or_default()),
        };
        let compare = Compare { key: key(Kind::Node, &name), revision: o.as_ref().map_or(0, |o| o.revision) };
        let out =
            execute(ctx, Controller::Agents, vec![Command::Txn { compares: vec![compare], ops: vec![op] }]).await?;
        if out.applied == 1 {
            let before = existing.as_ref().map(|n| n.status.gpu_health.clone()).unwrap_or_default();
            crate::node::log_gpu_changes(ctx, &name, &before, &status.gpu_health);
            let live = NodeLive {
                unhealthy_gpus: status.unhealthy_gpus.clone(),
                gpu_reports: Some(crate::gpu_health::reports(&reg.gpus)),
                ..NodeLive::new(&reg.agent_id, Instant::now())
            };
            lock(&ctx.live).insert(name.clone(), live);
            tracing::info!(node = %name, agent = %reg.agent_id, gpus = reg.gpus.len(), "agent registered");
            return Ok(name);
        }
        ctx.ensure_leader()?;
    }
    Err(ActorsError::WriteRefused(format!("node {} kept changing while registering; retry", reg.node_name)))
}

fn assign_msg(set: &[flotilla_api::pb::ReplicaAssignment]) -> Result<ServerMessage, Status> {
    Ok(ServerMessage { msg: Some(ServerMsg::Assign(Assign { replicas: set.to_vec() })) })
}

async fn run_session(
    ctx: Arc<Ctx>,
    node: ObjectName,
    agent_id: String,
    scope: AgentScope,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<ServerMessage, Status>>,
) {
    let mut assign = ctx.hub.subscribe(&node);
    let mut leading = ctx.handle.leadership();
    let mut sent_first = false;
    let ready = ctx.hub.wait_ready();
    tokio::pin!(ready);
    if let Some(s) = ctx.supervisor() {
        let _ = s.send_message(SupervisorMsg::Heard(node.clone()));
    }
    let end: Option<Status> = loop {
        tokio::select! {
            _ = &mut ready, if !sent_first => {
                sent_first = true;
                let set = assign.borrow_and_update().clone();
                if tx.send(assign_msg(&set)).await.is_err() { break None }
            }
            r = assign.changed(), if sent_first => {
                if r.is_err() { break None }
                let set = assign.borrow_and_update().clone();
                if tx.send(assign_msg(&set)).await.is_err() { break None }
            }
            m = inbound.message() => match m {
                Ok(Some(AgentMessage { msg: Some(AgentMsg::Heartbeat(hb)) })) => {
                    if let Err(status) = heartbeat(&ctx, &node, &agent_id, &scope, hb).await {
                        break Some(status);
                    }
                }
                Ok(Some(_)) => break Some(Status::invalid_argument("actors.invalid_argument: only heartbeats may follow Register")),
                Ok(None) | Err(_) => break None,
            },
            _ = crate::shared::lost(&mut leading) => {
                break Some(ctx.ensure_leader().err().unwrap_or(ActorsError::NoLeader).into());
            }
        }
    };
    if let Some(status) = end {
        let _ = tx.send(Err(status)).await;
    }
    if let Some(l) = lock(&ctx.live).get_mut(&node) {
        if l.agent_id == agent_id {
            l.connected = false;
        }
    }
    tracing::info!(node = %node, agent = %agent_id, "agent stream closed");
}

/// Records a heartbeat in memory and writes the replica changes it implies; one out of the
/// agent's bounds or scope is refused before either ([`check_heartbeat`]).
async fn heartbeat(
    ctx: &Arc<Ctx>,
    node: &ObjectName,
    agent_id: &str,
    scope: &AgentScope,
    mut hb: Heartbeat,
) -> Result<(), Status> {
    if let Err(e) = check_heartbeat(&mut hb, scope) {
        tracing::warn!(node = %node, agent = %agent_id, error = %e, "heartbeat refused");
        return Err(e.into());
    }
    ctx.metrics.heartbeats.inc();
    let now = Instant::now();
    let reports: HashMap<String, flotilla_api::pb::EngineReport> =
        hb.engines.into_iter().map(|e| (e.replica.clone(), e)).collect();
    let ttl = Duration::from_millis(ctx.config.node_ttl_ms);
    let was_silent = {
        let mut live = lock(&ctx.live);
        let l = live.entry(node.clone()).or_insert_with(|| NodeLive::new(agent_id, now));
        if l.agent_id != agent_id {
            return Err(Status::aborted(format!(
                "actors.superseded: node {node} was taken over by agent {}",
                l.agent_id
            )));
        }
        let silent = now.saturating_duration_since(l.last_heartbeat) >= ttl;
        l.last_heartbeat = now;
        l.connected = true;
        l.engines = reports.clone();
        if !hb.gpus.is_empty() {
            let reports = crate::gpu_health::reports(&hb.gpus);
            l.unhealthy_gpus = crate::gpu_health::failed(&reports);
            l.gpu_reports = Some(reports);
        }
        silent
    };
    ctx.beats.send_modify(|n| *n = n.wrapping_add(1));
    let reader = ctx.handle.reader();
    let Some(view) = reader.get(&key(Kind::Node, node)).0.and_then(|o| NodeView::from_stored(&o).ok()) else {
        return Err(Status::not_found(format!("actors.not_found: node {node} was deleted; register again")));
    };
    if was_silent || view.status.state == NodeState::NotReady {
        if let Some(s) = ctx.supervisor() {
            let _ = s.send_message(SupervisorMsg::Heard(node.clone()));
        }
    }
    let mut names: Vec<ObjectName> = reports.keys().filter_map(|r| r.parse().ok()).collect();
    names.extend(ctx.hub.draining(node));
    let replicas: Vec<ReplicaView> = names
        .iter()
        .filter_map(|n| reader.get(&key(Kind::Replica, n)).0)
        .filter_map(|o| ReplicaView::from_stored(&o).ok())
        .collect();
    // the other nodes this node's gang members share a replica with
    let others = crate::facts::member_nodes(&reader, &replicas, &view.name);
    if let Some(cmd) = heartbeat_txn(&view, &replicas, &reports, &others) {
        // Level-triggered: a refused or uncertain write is recomputed at the next heartbeat.
        if let Err(e) = execute(ctx, Controller::Agents, vec![cmd]).await {
            tracing::warn!(node = %node, error = %e, "heartbeat write outcome unknown; the next heartbeat recomputes it");
        }
    }
    Ok(())
}

#[cfg(test)]
mod identity_tests {
    use super::check_identity;
    use flotilla_security::{Identity, Role};

    #[test]
    fn an_agent_certificate_opens_only_its_own_nodes_session() {
        let a = Identity::new(Role::Agent, "node-a").unwrap();
        assert!(check_identity(None, "node-b").is_ok(), "security off");
        assert!(check_identity(Some(&a), "node-a").is_ok());
        let e = check_identity(Some(&a), "node-b").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("agent/node-a may not open the session of node \"node-b\""), "{}", e.message());
        let admin = Identity::new(Role::Admin, "node-a").unwrap();
        assert_eq!(check_identity(Some(&admin), "node-a").unwrap_err().code(), tonic::Code::PermissionDenied);
    }
}
