//! `AdapterService`, served by the leader: `EnsureLoaded` answers at once with the ready
//! endpoints that hold an adapter, or hands a demand to the base model's adapter controller
//! and waits (bounded) until an engine reports it loaded; `ReportUsage` records which
//! adapters gateways route to where, the clock of LRU eviction, and which have requests in
//! flight (never evicted). A demand the controller cannot place is answered at once with
//! the controller's reason: FAILED_PRECONDITION `actors.adapter_no_slot` when nothing can
//! be evicted, RESOURCE_EXHAUSTED `actors.adapter_busy` when the only candidates have
//! requests in flight (after [`BUSY_WAIT`]); it waits only while a load can progress.
//!
//! ```text
//!  gateway ─EnsureLoaded─> holders? ──yes──> endpoints
//!                             │ no
//!                             v
//!          Supervisor ─Demand─> adapter controller ─bind (Raft)─> Assign ─> agent loads
//!                             │                                               │
//!          wait: heartbeats (beats) / store changes ──────────── engine reports it loaded
//! ```
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::pb::adapter_service_server::AdapterService;
use flotilla_api::pb::{Endpoint, EnsureLoadedRequest, EnsureLoadedResponse, ReportUsageRequest, ReportUsageResponse};
use flotilla_api::spec::AdapterPhase;
use flotilla_api::{Kind, LabelSelector, ObjectName};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{AdapterView, Blocked, Demand, Unplaced};
use crate::facts::{is_down, read_node};
use crate::objects::{key, ModelView, ReplicaView};
use crate::shared::{lock, Ctx, FLIGHTS_TTL};
use crate::supervisor::SupervisorMsg;
use crate::ActorsError;

/// Wait when the request gives no timeout.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Longest wait a request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(120);
/// With every holder avoided (saturated) and no other replica taking the adapter within
/// this, the avoided holders are returned rather than nothing.
const AVOID_GRACE: Duration = Duration::from_secs(1);
/// A `Failed` status older than the demand is trusted only after this (the controller may
/// be about to retry on another replica).
const FAILED_GRACE: Duration = Duration::from_secs(2);
/// Usage entries kept at most.
const MAX_USAGE: usize = 100_000;
/// A demand whose slots are all held by adapters with requests in flight waits this long
/// for one of them to end, then is answered RESOURCE_EXHAUSTED (the gateway: 429).
pub const BUSY_WAIT: Duration = Duration::from_secs(1);
/// Most gateways whose in-flight counts are kept.
const MAX_GATEWAYS: usize = 1024;

pub struct AdapterServiceImpl {
    pub(crate) ctx: Arc<Ctx>,
}

/// Ready endpoints of `base` whose engine reports `adapter` loaded: (not avoided, all).
fn holders(
    ctx: &Ctx,
    base: &ObjectName,
    adapter: &str,
    avoid: &BTreeSet<ObjectName>,
) -> (Vec<Endpoint>, Vec<Endpoint>) {
    // Endpoints on nodes the leader lost stay in the gateways' tables (static stability)
    // but are no answer to "where can this adapter be served now".
    let reader = ctx.handle.reader();
    let up = |node: &str| node.parse::<ObjectName>().is_ok_and(|n| !is_down(read_node(&reader, &n).as_ref()));
    // And only replicas still assigned the adapter: one just evicted may still be listed
    // as loaded by its engine until the agent's next report.
    let sel = LabelSelector::for_model(base);
    let bound: BTreeSet<String> = reader
        .list(Kind::Replica, &sel)
        .0
        .iter()
        .filter_map(|o| ReplicaView::from_stored(o).ok())
        .filter(|r| r.spec.adapters.iter().any(|b| b.name.as_str() == adapter))
        .map(|r| r.name.to_string())
        .collect();
    let all: Vec<Endpoint> = crate::fleet_service::endpoints(ctx, base.as_str())
        .endpoints
        .into_iter()
        .filter(|e| e.loaded_adapters.iter().any(|a| a == adapter) && up(&e.node) && bound.contains(&e.replica))
        .collect();
    let preferred =
        all.iter().filter(|e| e.replica.parse().is_ok_and(|r: ObjectName| !avoid.contains(&r))).cloned().collect();
    (preferred, all)
}

/// Whether a replica outside `avoid` is assigned `adapter`.
fn bound_elsewhere(ctx: &Ctx, base: &ObjectName, adapter: &ObjectName, avoid: &BTreeSet<ObjectName>) -> bool {
    let sel = LabelSelector::for_model(base);
    ctx.handle
        .reader()
        .list(Kind::Replica, &sel)
        .0
        .iter()
        .filter_map(|o| ReplicaView::from_stored(o).ok())
        .any(|r| !avoid.contains(&r.name) && r.spec.adapters.iter().any(|b| &b.name == adapter))
}

fn response(endpoints: Vec<Endpoint>, cold: bool, start: Instant) -> Response<EnsureLoadedResponse> {
    Response::new(EnsureLoadedResponse { endpoints, cold, waited_ms: start.elapsed().as_millis() as u64 })
}

impl AdapterServiceImpl {
    fn demand(&self, base: &ObjectName, adapter: &ObjectName, demand: &Demand) -> Result<(), ActorsError> {
        let sup = self.ctx.supervisor().ok_or(ActorsError::NoLeader)?;
        sup.send_message(SupervisorMsg::Demand { base: base.clone(), adapter: adapter.clone(), demand: demand.clone() })
            .map_err(|_| ActorsError::NoLeader)
    }
}

#[tonic::async_trait]
impl AdapterService for AdapterServiceImpl {
    async fn ensure_loaded(&self, req: Request<EnsureLoadedRequest>) -> Result<Response<EnsureLoadedResponse>, Status> {
        self.ctx.ensure_leader()?;
        let start = Instant::now();
        let req = req.into_inner();
        let name: ObjectName = req
            .adapter
            .parse()
            .map_err(|e: flotilla_api::ApiError| ActorsError::InvalidArgument(format!("adapter: {e}")))?;
        let wait = match req.timeout_ms {
            0 => DEFAULT_WAIT,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_WAIT),
        };
        let avoid: BTreeSet<ObjectName> = req.avoid_replicas.iter().filter_map(|r| r.parse().ok()).collect();
        let reader = self.ctx.handle.reader();
        let object = reader
            .get(&key(Kind::Adapter, &name))
            .0
            .ok_or_else(|| ActorsError::NotFound(format!("adapter {name} not found")))?;
        let adapter = AdapterView::from_stored(&object)?;
        let base = adapter.spec.base_model.clone();
        let (preferred, _) = holders(&self.ctx, &base, name.as_str(), &avoid);
        if !preferred.is_empty() {
            return Ok(response(preferred, false, start));
        }
        let model = reader
            .get(&key(Kind::Model, &base))
            .0
            .and_then(|o| ModelView::from_stored(&o).ok())
            .ok_or_else(|| precondition(format!("adapter {name}: base model {base} does not exist")))?;
        adapter.spec.check_base(&model.spec).map_err(|e| precondition(format!("adapter {name}: {e}")))?;
        self.ctx.metrics.adapter_cold_loads.inc();
        let until = start + wait;
        let demand = Demand { avoid: avoid.clone(), until };
        self.demand(&base, &name, &demand)?;
        tracing::info!(adapter = %name, base = %base, avoid = avoid.len(), "on-demand load requested");
        let revision_at_demand = object.revision;
        let mut beats = self.ctx.beats.subscribe();
        let mut changes = reader.subscribe();
        let mut unplaced = self.ctx.adapter_unplaced.subscribe();
        let mut flights = self.ctx.adapter_flights.subscribe();
        let busy_until = start + BUSY_WAIT;
        let mut leading = self.ctx.handle.leadership();
        let mut resend = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
        loop {
            let (preferred, all) = holders(&self.ctx, &base, name.as_str(), &avoid);
            if !preferred.is_empty() {
                return Ok(response(preferred, true, start));
            }
            if !all.is_empty() && start.elapsed() >= AVOID_GRACE && !bound_elsewhere(&self.ctx, &base, &name, &avoid) {
                return Ok(response(all, false, start));
            }
            let current = reader.get(&key(Kind::Adapter, &name)).0;
            let Some(current) = current else {
                return Err(ActorsError::NotFound(format!("adapter {name} was deleted")).into());
            };
            if let Some(st) = AdapterView::from_stored(&current).ok().and_then(|a| a.status) {
                let fresh = current.revision != revision_at_demand || start.elapsed() >= FAILED_GRACE;
                if st.phase == AdapterPhase::Failed && fresh {
                    return Err(precondition(format!("adapter {name} cannot be loaded: {}", st.reason)));
                }
            }
            // The controller's verdict on a demand it could not place, made after ours.
            let verdict =
                unplaced.borrow_and_update().get(&name).filter(|(at, _)| *at >= start).map(|(_, u)| u.clone());
            let busy = match verdict {
                Some(Unplaced { blocked: Blocked::Full, reason }) => {
                    tracing::info!(adapter = %name, reason = %reason, "on-demand load refused: no slot can be freed");
                    return Err(Status::failed_precondition(format!(
                        "actors.adapter_no_slot: adapter {name} cannot be placed now: {reason}"
                    )));
                }
                Some(Unplaced { blocked: Blocked::InUse, reason }) if Instant::now() >= busy_until => {
                    tracing::info!(adapter = %name, reason = %reason, "on-demand load refused for now: slots busy");
                    return Err(Status::resource_exhausted(format!(
                        "actors.adapter_busy: adapter {name} cannot be placed now: {reason}"
                    )));
                }
                Some(Unplaced { blocked: Blocked::InUse, .. }) => true,
                _ => false,
            };
            tokio::select! {
                _ = beats.changed() => {}
                _ = changes.changed() => {}
                _ = unplaced.changed() => {}
                // A request in flight ended (or began): decide again at once.
                _ = flights.changed(), if busy => self.demand(&base, &name, &demand)?,
                _ = tokio::time::sleep_until(busy_until), if busy => {}
                _ = resend.tick() => self.demand(&base, &name, &demand)?,
                _ = crate::shared::lost(&mut leading) => {
                    return Err(self.ctx.ensure_leader().err().unwrap_or(ActorsError::NoLeader).into());
                }
                _ = tokio::time::sleep_until(until) => {
                    let why = AdapterView::from_stored(&current)
                        .ok()
                        .and_then(|a| a.status)
                        .map(|s| format!("{:?}: {}", s.phase, s.reason))
                        .unwrap_or_else(|| "no status yet".into());
                    return Err(Status::deadline_exceeded(format!(
                        "actors.adapter_load_timeout: adapter {name} was not loaded within {} ms ({why})",
                        wait.as_millis()
                    )));
                }
            }
        }
    }

    async fn report_usage(&self, req: Request<ReportUsageRequest>) -> Result<Response<ReportUsageResponse>, Status> {
        self.ctx.ensure_leader()?;
        let req = req.into_inner();
        // empty from gateways older than in-flight counts
        if req.gateway_id.len() > crate::agent_bounds::MAX_SHORT {
            return Err(ActorsError::InvalidArgument("gateway_id must be at most 128 characters".into()).into());
        }
        let usage = req.usage;
        if usage.is_empty() && req.gateway_id.is_empty() {
            return Ok(Response::new(ReportUsageResponse {}));
        }
        let (replicas, _) = self.ctx.handle.reader().list(Kind::Replica, &LabelSelector::default());
        let by_address: HashMap<String, ObjectName> = replicas
            .iter()
            .filter_map(|o| ReplicaView::from_stored(o).ok())
            .filter_map(|r| Some((r.status.endpoint.clone()?, r.name)))
            .collect();
        let now = Instant::now();
        let mut book = lock(&self.ctx.adapter_usage);
        for u in usage.iter().filter(|u| u.requests > 0) {
            let (Ok(adapter), Some(replica)) = (u.adapter.parse::<ObjectName>(), by_address.get(&u.address)) else {
                continue;
            };
            book.insert((adapter, replica.clone()), now);
        }
        if book.len() > MAX_USAGE {
            let horizon = Duration::from_secs(3600);
            book.retain(|_, t| now.saturating_duration_since(*t) < horizon);
        }
        drop(book);
        if !req.gateway_id.is_empty() {
            // This gateway's in-flight pairs replace its previous ones.
            let pairs: BTreeSet<(ObjectName, ObjectName)> = usage
                .iter()
                .filter(|u| u.in_flight > 0)
                .filter_map(|u| Some((u.adapter.parse::<ObjectName>().ok()?, by_address.get(&u.address)?.clone())))
                .collect();
            self.ctx.adapter_flights.send_if_modified(|all| {
                all.retain(|_, g| g.at.is_some_and(|t| now.saturating_duration_since(t) < FLIGHTS_TTL));
                if all.len() >= MAX_GATEWAYS && !all.contains_key(&req.gateway_id) {
                    return false;
                }
                let g = all.entry(req.gateway_id.clone()).or_default();
                g.at = Some(now);
                let changed = g.pairs != pairs;
                g.pairs = pairs;
                changed
            });
        }
        Ok(Response::new(ReportUsageResponse {}))
    }
}

fn precondition(msg: String) -> Status {
    Status::failed_precondition(format!("actors.adapter_unavailable: {msg}"))
}
