//! The `ObjectService`: apply, get, list, delete and watch objects. Input is validated here
//! before anything is proposed or forwarded; writes and linearizable reads are served on the
//! leader (forwarded once from a follower); watches stream from the local state machine.
use std::pin::Pin;

use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::object_service_server::ObjectService;
use flotilla_api::pb::{
    ApplyRequest, ApplyResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse, ListRequest, ListResponse,
    WatchEvent, WatchRequest,
};
use flotilla_api::spec::{AdapterSpec, ModelSpec};
use flotilla_api::{ApiError, Kind, LabelSelector, Manifest, ObjectKey, ObjectName, Spec};
use flotilla_storage::{Command, CommandResult, Compare, TxnOp};
use flotilla_telemetry::propagation::TRACEPARENT;
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use crate::forwarded::{self, api_write, forward_write, identity_of as caller_of, is_forwarded};
use crate::node::{Node, Route, LEADER_CHANGED};
use crate::redact;
use crate::scope;
use crate::ClusterError;

pub(crate) struct ObjectServiceImpl {
    pub(crate) node: Node,
}

/// Events sent per read of the history while a watch catches up.
const WATCH_BATCH: usize = 256;

/// Whether a failed forward is tried again: one that failed because the leader is gone or no
/// longer leads is, at once when it was abandoned because this server's view of the leader
/// changed (the new leader is known, or waited for by the next propose or read-index), else
/// after the election backoff while the deadline allows.
async fn retry_forward<T>(node: &Node, r: &Result<T, Status>, deadline: Instant) -> bool {
    match r {
        Err(s) if s.code() == Code::Unavailable => {
            s.message().starts_with(LEADER_CHANGED) || node.backoff(deadline).await
        }
        _ => false,
    }
}

fn parse_key(kind: &str, name: &str) -> Result<ObjectKey, ClusterError> {
    let kind: Kind = kind.parse()?;
    let name: ObjectName = name.parse()?;
    Ok(ObjectKey { kind, name })
}

/// The answer to a result a handler has no arm for: a repeat whose first answer is gone
/// (`AlreadyApplied`) is an unknown outcome; anything else is a bug.
fn unexpected(r: CommandResult) -> Status {
    match r {
        CommandResult::AlreadyApplied { revision } => ClusterError::OutcomeUnknown(revision).into(),
        r => Status::internal(format!("cluster.internal: unexpected command result {r:?}")),
    }
}

impl ObjectServiceImpl {
    /// INVALID_ARGUMENT unless this server's mode holds `kind` (a federation server holds
    /// Clusters, FederatedModels and tokens; a cluster's server everything else).
    fn held_here(&self, kind: Kind) -> Result<(), Status> {
        if kind.held_by(self.node.federation) {
            return Ok(());
        }
        let why = match self.node.federation {
            true => format!(
                "kind: {kind} is not held by a federation server (it holds Clusters and FederatedModels); apply it to a member cluster, or spread it with a FederatedModel"
            ),
            false => format!(
                "kind: {kind} is held by a federation server (`flotilla server --federation`), not by a cluster's"
            ),
        };
        Err(Status::invalid_argument(why))
    }

    fn client(&self, addr: &str) -> ObjectServiceClient<tonic::transport::Channel> {
        ObjectServiceClient::new(self.node.peers.channel(addr))
    }

    /// Refuses a tenant holding a key another tenant holds (a gateway could not tell whose
    /// it is). Checked against this server's state: two racing writes could still slip a
    /// shared key in, and gateways then refuse that key (`flotilla_gateway`'s tenant table).
    fn refuse_shared_keys(&self, key: &ObjectKey, tenant: &flotilla_api::spec::TenantSpec) -> Result<(), Status> {
        // A tenant without keys shares none: skip the scan of every tenant.
        if tenant.key_hashes().next().is_none() {
            return Ok(());
        }
        let (others, _) = self.node.reader.list(Kind::Tenant, &LabelSelector::default());
        for other in others.iter().filter(|o| o.key != *key) {
            let Ok(spec) = serde_json::from_value::<flotilla_api::spec::TenantSpec>(other.spec.clone()) else {
                continue;
            };
            let theirs: std::collections::HashSet<&str> = spec.key_hashes().collect();
            if let Some(i) = tenant.key_hashes().position(|h| theirs.contains(h)) {
                let e = ApiError::invalid(
                    tenant.key_field(i),
                    format!("is a key of tenant {} already; every key names one tenant", other.key.name),
                );
                return Err(ClusterError::from(e).into());
            }
        }
        Ok(())
    }

    /// For a caller limited by a label selector (`crate::scope`): reads `key` linearizably,
    /// checks its labels as they are and as they would be (`after`, None for a delete), and
    /// returns the revision to pin the write to. Anyone else: `expected` unchanged.
    async fn pin_scope(
        &self,
        caller: Option<&flotilla_security::Identity>,
        key: &ObjectKey,
        after: Option<&std::collections::BTreeMap<String, String>>,
        expected: Option<u64>,
    ) -> Result<Option<u64>, Status> {
        let Some(identity) = caller else { return Ok(expected) };
        let Some(selector) = scope::selector_of(identity)? else { return Ok(expected) };
        let get = GetRequest { kind: key.kind.as_str().into(), name: key.name.to_string(), stale: false };
        let current = match self.get_inner(Request::new(get)).await {
            Ok(r) => r.into_inner().object,
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => return Err(s),
        };
        let before: Option<std::collections::BTreeMap<String, String>> =
            current.as_ref().map(|o| o.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        scope::check(identity, &selector, key, before.as_ref(), after)?;
        let actual = current.map_or(0, |o| o.revision);
        match expected {
            Some(e) if e != actual => Err(ClusterError::Conflict { key: key.clone(), expected: e, actual }.into()),
            _ => Ok(Some(actual)),
        }
    }

    async fn write(&self, cmd: Command, forwarded: bool, deadline: Instant) -> Result<Route<CommandResult>, Status> {
        // the Raft round: proposed, committed by a quorum and applied here (or the leader named)
        let span = tracing::debug_span!("server.raft_commit", outcome = tracing::field::Empty);
        let proposed = self.node.propose(cmd, deadline).instrument(span.clone()).await;
        if !span.is_disabled() {
            span.record(
                "outcome",
                match &proposed {
                    Ok(Route::Done(_)) => "committed",
                    Ok(Route::Leader(_)) => "not_leader",
                    Err(_) => "error",
                },
            );
        }
        match proposed? {
            Route::Leader(addr) if forwarded => {
                tracing::debug!(leader = %addr, "forwarded write reached a non-leader");
                Err(ClusterError::NoLeader.into())
            }
            route => Ok(route),
        }
    }

    /// Linearizes a read unless `stale`; `Leader(addr)` means forward it.
    async fn read_route(&self, stale: bool, forwarded: bool, deadline: Instant) -> Result<Route<()>, Status> {
        if stale {
            return Ok(Route::Done(()));
        }
        match self.node.linearize(deadline).await? {
            Route::Leader(_) if forwarded => Err(ClusterError::NoLeader.into()),
            route => Ok(route),
        }
    }

    // The four handlers below repeat one "serve here or forward to the leader, retry while it
    // goes away" loop. A generic helper taking `AsyncFnMut` closures reads better but does not
    // compile under tonic's `async_trait`: the closures' futures borrow locals, and rustc
    // reports "implementation of `Send` is not general enough" (the async-closure Send-bound
    // limitation). Revisit when return-type notation for async closures is stable.
    pub(crate) async fn apply_inner(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let caller = caller_of(&request);
        let id = forwarded::request_id(&request);
        let manifest = Manifest::parse(&request.get_ref().manifest).map_err(ClusterError::from)?;
        self.held_here(manifest.kind())?;
        flotilla_security::authz::check_kind(caller.as_ref(), manifest.kind().as_str()).map_err(|r| r.status())?;
        let key = ObjectKey { kind: manifest.kind(), name: manifest.metadata.name.clone() };
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("kind", manifest.kind().as_str());
            span.record("name", manifest.metadata.name.as_str());
        }
        let by = forwarded::caller(&request, "Apply", key.to_string());
        let mut req = request.into_inner();
        req.expected_revision =
            self.pin_scope(caller.as_ref(), &key, Some(&manifest.metadata.labels), req.expected_revision).await?;
        if let Spec::Adapter(adapter) = &manifest.spec {
            return self.apply_adapter(req.clone(), (id, by), &manifest, adapter, forwarded).await;
        }
        if let Spec::Tenant(tenant) = &manifest.spec {
            self.refuse_shared_keys(&key, tenant)?;
        }
        // A Model's controller decision continues this apply's trace (crate::trace_links).
        let link = match key.kind {
            Kind::Model => flotilla_telemetry::propagation::traceparent(&span).map(|tp| {
                self.node.trace_links.record(key.clone(), self.node.reader.revision(), tp);
                key.clone()
            }),
            _ => None,
        };
        let put = Command::Put {
            key,
            uid: uuid::Uuid::new_v4().to_string(),
            labels: manifest.metadata.labels.clone(),
            spec: manifest.spec.to_json(),
            expected_revision: req.expected_revision,
        };
        let cmd = api_write(id, by.clone(), put);
        let deadline = self.node.deadline();
        loop {
            let written = self.write(cmd.clone(), forwarded, deadline).await;
            let kept = matches!(&written, Ok(Route::Done(CommandResult::Put { unchanged: false, .. })));
            if let Some(k) = link.as_ref().filter(|_| !kept) {
                // no new revision here for a controller to act on
                self.node.trace_links.forget(k);
            }
            let addr = match written? {
                Route::Done(CommandResult::Put { object, created, unchanged }) => {
                    return Ok(Response::new(ApplyResponse { object: Some((&object).into()), created, unchanged }));
                }
                Route::Done(CommandResult::Conflict { key, expected, actual }) => {
                    return Err(ClusterError::Conflict { key, expected, actual }.into());
                }
                Route::Done(other) => return Err(unexpected(other)),
                Route::Leader(addr) => addr,
            };
            let forward = forward_write(req.clone(), id, &by, deadline);
            let r = self.node.forward(&addr, self.client(&addr).apply(forward)).await;
            if retry_forward(&self.node, &r, deadline).await {
                continue;
            }
            return r;
        }
    }

    /// Applies an `Adapter`, checked against its base model (it must exist and serve LoRA at
    /// the adapter's rank) in one transaction fenced by the base model's revision, so a
    /// concurrent change of the base model cannot slip between the check and the write.
    async fn apply_adapter(
        &self,
        req: ApplyRequest,
        (id, by): (u128, flotilla_storage::audit::Caller),
        manifest: &Manifest,
        adapter: &AdapterSpec,
        forwarded: bool,
    ) -> Result<Response<ApplyResponse>, Status> {
        let key = ObjectKey { kind: Kind::Adapter, name: manifest.metadata.name.clone() };
        let base_key = ObjectKey { kind: Kind::Model, name: adapter.base_model.clone() };
        let spec = manifest.spec.to_json();
        let deadline = self.node.deadline();
        loop {
            let addr = match self.read_route(false, forwarded, deadline).await? {
                Route::Leader(addr) => addr,
                Route::Done(()) => {
                    // A retry of a forward whose first attempt committed: answer it, do not
                    // check it again (its own write would fail the revision check).
                    if let Some(first) = self.node.reader.applied_result(id, None) {
                        let CommandResult::Txn { revision } = first else { return Err(unexpected(first)) };
                        let (object, _) = self.node.reader.get(&key);
                        let object = object.ok_or_else(|| ClusterError::OutcomeUnknown(revision))?;
                        return Ok(Response::new(ApplyResponse {
                            object: Some((&object).into()),
                            created: false,
                            unchanged: false,
                        }));
                    }
                    let (base, _) = self.node.reader.get(&base_key);
                    let base = base.ok_or_else(|| {
                        ClusterError::from(ApiError::invalid(
                            "spec.base_model",
                            format!("model {} does not exist; apply the base model first", adapter.base_model),
                        ))
                    })?;
                    let base_spec: ModelSpec = serde_json::from_value(base.spec.clone())
                        .map_err(|e| Status::internal(format!("cluster.internal: stored model {base_key}: {e}")))?;
                    adapter.check_base(&base_spec).map_err(ClusterError::from)?;
                    let (current, _) = self.node.reader.get(&key);
                    let actual = current.as_ref().map_or(0, |o| o.revision);
                    if let Some(expected) = req.expected_revision.filter(|e| *e != actual) {
                        return Err(ClusterError::Conflict { key, expected, actual }.into());
                    }
                    if let Some(cur) =
                        current.as_ref().filter(|c| c.spec == spec && c.labels == manifest.metadata.labels)
                    {
                        return Ok(Response::new(ApplyResponse {
                            object: Some(cur.into()),
                            created: false,
                            unchanged: true,
                        }));
                    }
                    let txn = Command::Txn {
                        compares: vec![
                            Compare { key: base_key.clone(), revision: base.revision },
                            Compare { key: key.clone(), revision: actual },
                        ],
                        ops: vec![TxnOp::Put {
                            key: key.clone(),
                            uid: current.as_ref().map_or_else(|| uuid::Uuid::new_v4().to_string(), |c| c.uid.clone()),
                            labels: manifest.metadata.labels.clone(),
                            spec: spec.clone(),
                            status: None,
                        }],
                    };
                    match self.write(api_write(id, by.clone(), txn), forwarded, deadline).await? {
                        Route::Done(CommandResult::Txn { .. }) => {
                            let (object, _) = self.node.reader.get(&key);
                            let object =
                                object.ok_or_else(|| unexpected(CommandResult::NotFound { key: key.clone() }))?;
                            return Ok(Response::new(ApplyResponse {
                                object: Some((&object).into()),
                                created: current.is_none(),
                                unchanged: false,
                            }));
                        }
                        // The base model or the adapter changed since the check: check again.
                        Route::Done(CommandResult::Conflict { .. }) if self.node.backoff(deadline).await => continue,
                        Route::Done(other) => return Err(unexpected(other)),
                        Route::Leader(addr) => addr,
                    }
                }
            };
            let forward = forward_write(req.clone(), id, &by, deadline);
            let r = self.node.forward(&addr, self.client(&addr).apply(forward)).await;
            if retry_forward(&self.node, &r, deadline).await {
                continue;
            }
            return r;
        }
    }

    async fn delete_inner(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let caller = caller_of(&request);
        let id = forwarded::request_id(&request);
        let key = parse_key(&request.get_ref().kind, &request.get_ref().name)?;
        flotilla_security::authz::check_kind(caller.as_ref(), key.kind.as_str()).map_err(|r| r.status())?;
        let by = forwarded::caller(&request, "Delete", key.to_string());
        let mut req = request.into_inner();
        req.expected_revision = self.pin_scope(caller.as_ref(), &key, None, req.expected_revision).await?;
        let cmd = api_write(id, by.clone(), Command::Delete { key, expected_revision: req.expected_revision });
        let deadline = self.node.deadline();
        loop {
            let addr = match self.write(cmd.clone(), forwarded, deadline).await? {
                Route::Done(CommandResult::Deleted { object, revision }) => {
                    return Ok(Response::new(DeleteResponse { object: Some((&object).into()), revision }));
                }
                Route::Done(CommandResult::NotFound { key }) => return Err(ClusterError::NotFound(key).into()),
                Route::Done(CommandResult::Conflict { key, expected, actual }) => {
                    return Err(ClusterError::Conflict { key, expected, actual }.into());
                }
                Route::Done(other) => return Err(unexpected(other)),
                Route::Leader(addr) => addr,
            };
            let forward = forward_write(req.clone(), id, &by, deadline);
            let r = self.node.forward(&addr, self.client(&addr).delete(forward)).await;
            if retry_forward(&self.node, &r, deadline).await {
                continue;
            }
            return r;
        }
    }

    pub(crate) async fn get_inner(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let key = parse_key(&req.kind, &req.name)?;
        let deadline = self.node.deadline();
        loop {
            let addr = match self.read_route(req.stale, forwarded, deadline).await? {
                Route::Done(()) => {
                    let (object, store_revision) = self.node.reader.get(&key);
                    let object = object.ok_or_else(|| ClusterError::NotFound(key.clone()))?;
                    return Ok(Response::new(GetResponse { object: Some((&object).into()), store_revision }));
                }
                Route::Leader(addr) => addr,
            };
            let r = self.node.forward(&addr, self.client(&addr).get(forwarded::forward(req.clone(), deadline))).await;
            if retry_forward(&self.node, &r, deadline).await {
                continue;
            }
            return r;
        }
    }

    async fn list_inner(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let kind: Kind = req.kind.parse().map_err(ClusterError::from)?;
        let selector = LabelSelector::parse(&req.label_selector).map_err(ClusterError::from)?;
        let deadline = self.node.deadline();
        loop {
            let addr = match self.read_route(req.stale, forwarded, deadline).await? {
                Route::Done(()) => {
                    let (objects, store_revision) = self.node.reader.list(kind, &selector);
                    let objects = objects.iter().map(Into::into).collect();
                    return Ok(Response::new(ListResponse { objects, store_revision }));
                }
                Route::Leader(addr) => addr,
            };
            let r = self.node.forward(&addr, self.client(&addr).list(forwarded::forward(req.clone(), deadline))).await;
            if retry_forward(&self.node, &r, deadline).await {
                continue;
            }
            return r;
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ObjectService for ObjectServiceImpl {
    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let timer = self.node.metrics.grpc_timer("Apply");
        let caller = caller_of(&request);
        let span = tracing::debug_span!(
            "server.apply",
            otel.kind = "server",
            forwarded = is_forwarded(&request),
            kind = tracing::field::Empty,
            name = tracing::field::Empty,
            revision = tracing::field::Empty,
            created = tracing::field::Empty,
            unchanged = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        if !span.is_disabled() {
            // a forwarding server's (or a client's) trace context: one trace across the hop
            if let Some(tp) = request.metadata().get(TRACEPARENT).and_then(|v| v.to_str().ok()) {
                flotilla_telemetry::propagation::set_parent_traceparent(&span, tp);
            }
        }
        let mut r = self.apply_inner(request).instrument(span.clone()).await;
        if !span.is_disabled() {
            match &r {
                Ok(resp) => {
                    let resp = resp.get_ref();
                    if let Some(o) = &resp.object {
                        // i64: tracing-opentelemetry exports a u64 as a string
                        span.record("revision", i64::try_from(o.revision).unwrap_or(i64::MAX));
                    }
                    span.record("created", resp.created);
                    span.record("unchanged", resp.unchanged);
                }
                Err(s) => {
                    span.record("error", s.message());
                }
            }
        }
        drop(span);
        if let Ok(r) = &mut r {
            redact::for_caller(caller.as_ref(), r.get_mut().object.as_mut());
        }
        timer.finish(r)
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let timer = self.node.metrics.grpc_timer("Get");
        let caller = caller_of(&request);
        let mut r = self.get_inner(request).await;
        if let Ok(r) = &mut r {
            redact::for_caller(caller.as_ref(), r.get_mut().object.as_mut());
        }
        timer.finish(r)
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let timer = self.node.metrics.grpc_timer("List");
        let caller = caller_of(&request);
        let mut r = self.list_inner(request).await;
        if let Ok(r) = &mut r {
            r.get_mut().objects.iter_mut().for_each(|o| redact::for_caller(caller.as_ref(), Some(o)));
        }
        timer.finish(r)
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let timer = self.node.metrics.grpc_timer("Delete");
        let caller = caller_of(&request);
        let mut r = self.delete_inner(request).await;
        if let Ok(r) = &mut r {
            redact::for_caller(caller.as_ref(), r.get_mut().object.as_mut());
        }
        timer.finish(r)
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let timer = self.node.metrics.grpc_timer("Watch");
        let secrets = redact::secrets_of(caller_of(&request).as_ref());
        let req = request.into_inner();
        let kind = if req.kind.is_empty() {
            None
        } else {
            Some(req.kind.parse::<Kind>().map_err(ClusterError::from).map_err(Status::from)?)
        };
        // Fail fast, before the stream starts, if the history is already gone.
        if let Err(c) = self.node.reader.events_after(kind, req.after_revision, 0) {
            let e = ClusterError::Compacted { requested: req.after_revision, compacted: c.compacted };
            return timer.finish(Err(e.into()));
        }
        let (tx, rx) = mpsc::channel(WATCH_BATCH);
        tokio::spawn(stream_events(self.node.reader.clone(), kind, req.after_revision, secrets, tx));
        timer.finish(Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as WatchStream)))
    }
}

/// Sends every event after `cursor`, then follows new ones, until the client goes away.
async fn stream_events(
    reader: flotilla_storage::StoreReader,
    kind: Option<Kind>,
    mut cursor: u64,
    secrets: redact::Secrets,
    tx: mpsc::Sender<Result<WatchEvent, Status>>,
) {
    let mut changes = reader.subscribe();
    loop {
        changes.borrow_and_update();
        let (events, scanned_to) = match reader.events_after(kind, cursor, WATCH_BATCH) {
            Ok(r) => r,
            Err(c) => {
                let e = ClusterError::Compacted { requested: cursor, compacted: c.compacted };
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let caught_up = events.len() < WATCH_BATCH;
        for e in &events {
            let mut event: WatchEvent = e.into();
            event.object.iter_mut().for_each(|o| redact::redact(secrets, o));
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        cursor = scanned_to;
        if caught_up {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    }
}
