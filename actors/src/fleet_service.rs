//! `FleetService`: the operators' and gateways' view of the running fleet, served by the
//! leader. `WatchEndpoints` streams full snapshots of the ready endpoints (on change, and
//! every `endpoints_refresh_ms` with fresh load figures from memory); `ListNodes` joins
//! Node objects with heartbeat ages; `SetNode` writes cordon/uncordon/drain through Raft.
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use flotilla_api::pb::fleet_service_server::FleetService;
use flotilla_api::pb::{
    Endpoint, EndpointSet, ListNodesRequest, ListNodesResponse, NodeAction, NodeActionRequest, NodeActionResponse,
    NodeInfo, WatchEndpointsRequest,
};
use flotilla_api::spec::{NodeState, ReplicaPhase};
use flotilla_api::{Kind, LabelSelector, ObjectName};
use flotilla_storage::{Command, CommandResult};
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::config::ActorsConfig;
use crate::objects::{key, NodeView, ReplicaView};
use crate::shared::{lock, Ctx, NodeLive};
use crate::ActorsError;

pub struct FleetServiceImpl {
    pub(crate) ctx: Arc<Ctx>,
}

/// The state an operator sees: the stored state, corrected at once for a spec change the
/// node actor has not yet written.
pub fn effective_state(n: &NodeView) -> NodeState {
    match (n.status.state, n.spec.cordoned, n.spec.draining) {
        (NodeState::NotReady, _, _) => NodeState::NotReady,
        (NodeState::Draining | NodeState::Drained, _, true) => n.status.state,
        (_, _, true) => NodeState::Draining,
        (_, true, false) => NodeState::Cordoned,
        (_, false, false) => NodeState::Ready,
    }
}

fn node_info(n: &NodeView, live: Option<&NodeLive>, now: Instant) -> NodeInfo {
    let mut replicas: Vec<String> = n.status.allocations.values().map(|r| r.to_string()).collect();
    replicas.dedup();
    let mut types: Vec<String> = n.spec.gpus.iter().map(|g| g.gpu_type.clone()).collect();
    types.sort();
    types.dedup();
    NodeInfo {
        name: n.name.to_string(),
        address: n.spec.address.clone(),
        state: format!("{:?}", effective_state(n)),
        reason: n.status.reason.clone(),
        gpus_total: n.spec.gpus.len() as u32,
        gpus_free: n.free_gpus() as u32,
        gpu_types: types,
        replicas,
        heartbeat_age_ms: live.map_or(0, |l| now.saturating_duration_since(l.last_heartbeat).as_millis().max(1) as u64),
        labels: n.labels.clone().into_iter().collect(),
    }
}

/// The ready endpoints (of `model`, or all), with load from the latest heartbeats.
pub fn endpoints(ctx: &Ctx, model: &str) -> EndpointSet {
    let reader = ctx.handle.reader();
    let all = LabelSelector::default();
    let (nodes, _) = reader.list(Kind::Node, &all);
    let nodes: HashMap<ObjectName, NodeView> =
        nodes.iter().filter_map(|o| NodeView::from_stored(o).ok()).map(|n| (n.name.clone(), n)).collect();
    let sel = if model.is_empty() { all } else { LabelSelector::label_eq(crate::objects::MODEL_LABEL, model) };
    let (replicas, revision) = reader.list(Kind::Replica, &sel);
    let live = lock(&ctx.live);
    let mut out = Vec::new();
    for r in replicas.iter().filter_map(|o| ReplicaView::from_stored(o).ok()) {
        let (Some(addr), Some(node)) = (&r.status.endpoint, r.spec.node.as_ref().and_then(|n| nodes.get(n))) else {
            continue;
        };
        // A NotReady node's Ready replicas stay routable until they are rescheduled: losing
        // contact with an agent (a partition, a leader change, the agent itself down) says
        // nothing about its engines, which keep serving (static stability), and gateways
        // have their own signal for dead engines (failed requests eject an endpoint).
        // Dropping them here turned every control-plane hiccup into a data-plane outage.
        if r.phase() != ReplicaPhase::Ready {
            continue;
        }
        let report = live.get(&node.name).and_then(|l| l.engines.get(r.name.as_str()));
        let gpu_type =
            r.spec.gpus.first().and_then(|g| node.spec.gpus.iter().find(|x| x.index == *g)).map(|g| g.gpu_type.clone());
        out.push(Endpoint {
            replica: r.name.to_string(),
            model: r.spec.model.to_string(),
            address: addr.clone(),
            node: node.name.to_string(),
            gpu_type: gpu_type.unwrap_or_default(),
            // Loaded per the engine and still assigned: an adapter being evicted leaves the
            // gateways' tables when its binding goes, before the engine unloads it.
            loaded_adapters: report
                .map(|e| {
                    e.loaded_adapters
                        .iter()
                        .filter(|a| r.spec.adapters.iter().any(|b| b.name.as_str() == a.as_str()))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
            num_requests_running: report.map_or(0.0, |e| e.num_requests_running),
            num_requests_waiting: report.map_or(0.0, |e| e.num_requests_waiting),
            kv_cache_usage: report.map_or(0.0, |e| e.kv_cache_usage),
            // From the stored status, not the live report: a new leader knows it at once.
            api_key: r.status.api_key.clone().unwrap_or_default(),
            template_hash: r.spec.template_hash(),
            engine_cert_sha256: r.status.engine_cert_sha256.clone().unwrap_or_default(),
        });
    }
    EndpointSet { endpoints: out, store_revision: revision }
}

/// What makes two snapshots "the same set" (load figures aside): each replica's address,
/// node, engine key and certificate pin.
fn identity(s: &EndpointSet) -> BTreeMap<String, [String; 4]> {
    s.endpoints
        .iter()
        .map(|e| {
            let id = [&e.address, &e.node, &e.api_key, &e.engine_cert_sha256].map(String::clone);
            (e.replica.clone(), id)
        })
        .collect()
}

type EndpointStream = Pin<Box<dyn Stream<Item = Result<EndpointSet, Status>> + Send>>;

#[tonic::async_trait]
impl FleetService for FleetServiceImpl {
    type WatchEndpointsStream = EndpointStream;

    async fn watch_endpoints(&self, req: Request<WatchEndpointsRequest>) -> Result<Response<EndpointStream>, Status> {
        self.ctx.ensure_leader()?;
        let model = req.into_inner().model;
        let ctx = self.ctx.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let refresh = ActorsConfig::ms(ctx.config.endpoints_refresh_ms);
            let mut changes = ctx.handle.reader().subscribe();
            let mut leading = ctx.handle.leadership();
            let mut last: Option<BTreeMap<String, [String; 4]>> = None;
            let mut last_sent = Instant::now();
            loop {
                let snap = endpoints(&ctx, &model);
                let id = identity(&snap);
                if last.as_ref() != Some(&id) || last_sent.elapsed() >= refresh {
                    last = Some(id);
                    last_sent = Instant::now();
                    if tx.send(Ok(snap)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep_until(last_sent + refresh) => {}
                    _ = crate::shared::lost(&mut leading) => {
                        let e = ctx.ensure_leader().err().unwrap_or(ActorsError::NoLeader);
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
                // Coalesce bursts of store changes.
                tokio::time::sleep(ActorsConfig::ms(20)).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_nodes(&self, _req: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        self.ctx.ensure_leader()?;
        let (list, _) = self.ctx.handle.reader().list(Kind::Node, &LabelSelector::default());
        let live = lock(&self.ctx.live);
        let now = Instant::now();
        let nodes = list
            .iter()
            .filter_map(|o| NodeView::from_stored(o).ok())
            .map(|n| node_info(&n, live.get(&n.name), now))
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn set_node(&self, req: Request<NodeActionRequest>) -> Result<Response<NodeActionResponse>, Status> {
        self.ctx.ensure_leader()?;
        let req = req.into_inner();
        let action = NodeAction::try_from(req.action).map_err(|_| {
            ActorsError::InvalidArgument(format!("action {} is not CORDON, UNCORDON or DRAIN", req.action))
        })?;
        let name: ObjectName =
            req.name.parse().map_err(|e: flotilla_api::ApiError| ActorsError::InvalidArgument(format!("name: {e}")))?;
        for _ in 0..5 {
            let (o, _) = self.ctx.handle.reader().get(&key(Kind::Node, &name));
            let o = o.ok_or_else(|| ActorsError::NotFound(format!("node {name} not found")))?;
            let mut n = NodeView::from_stored(&o)?;
            match action {
                NodeAction::Cordon => n.spec.cordoned = true,
                NodeAction::Uncordon => (n.spec.cordoned, n.spec.draining) = (false, false),
                NodeAction::Drain => (n.spec.cordoned, n.spec.draining) = (true, true),
            }
            let cmd = Command::Put {
                key: o.key.clone(),
                uid: o.uid.clone(),
                labels: o.labels.clone(),
                spec: serde_json::to_value(&n.spec).unwrap_or_default(),
                expected_revision: Some(o.revision),
            };
            match self.ctx.handle.propose(cmd).await.map_err(ActorsError::from_propose)? {
                CommandResult::Put { object, .. } => {
                    let n = NodeView::from_stored(&object)?;
                    tracing::info!(node = %name, action = ?action, "node action applied");
                    let info = node_info(&n, lock(&self.ctx.live).get(&name), Instant::now());
                    return Ok(Response::new(NodeActionResponse { node: Some(info) }));
                }
                _ => continue,
            }
        }
        Err(ActorsError::WriteRefused(format!("node {name} kept changing; retry")).into())
    }
}
