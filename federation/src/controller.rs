//! The federation's controller: on the leader of the federation group, every tick (and on
//! each change to the federation's store) it
//!
//! 1. reads every member cluster's Models and Replicas through the cluster's API, all
//!    clusters at once, each bounded by [`crate::member::CALL_TIMEOUT`] (an answer or not:
//!    [`Reach`]);
//! 2. spreads each FederatedModel over its selected clusters ([`placement::spread`]), with
//!    the clusters past the grace left out and Pending shortfalls capping a cluster
//!    ([`Shortfall`]);
//! 3. applies or deletes member Models where they differ ([`reconcile::action`]), and each
//!    FederatedAdapter's member Adapter in the clusters that run its base FederatedModel —
//!    one object's writes to all its clusters at once;
//! 4. writes each Cluster's and FederatedModel's status, only when it changed.
//!
//! A member Model of a FederatedModel that no longer exists, or of a cluster no longer
//! selected, is deleted (it carries the federation's label, so it is the federation's to
//! delete). A cluster that is unavailable keeps whatever it runs: nothing can reach it, and
//! when it is back its share is recomputed with it included.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::spec::{ClusterSpec, FederatedAdapterSpec, FederatedModelSpec, ModelSpec};
use flotilla_api::{Kind, LabelSelector, ObjectKey, StoredObject};
use flotilla_cluster::ClusterHandle;
use flotilla_storage::Command;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::member::{CallError, Member};
use crate::metrics::Metrics;
use crate::placement::{self, Candidate, Policy};
use crate::reconcile::{self, Action, MemberObject};
use crate::tracking::{Reach, Shortfall};
use crate::FederationConfig;

/// What the controller knows of one member cluster.
struct ClusterView {
    spec: ClusterSpec,
    labels: BTreeMap<String, String>,
    member: Arc<Member>,
    reach: Reach,
    /// Wall-clock time of the last reachability change (status).
    since_unix_ms: u64,
    /// Why the last read failed, when it did.
    error: String,
    /// Its Models and Adapters by name, from the last successful read.
    models: BTreeMap<String, MemberObject>,
    adapters: BTreeMap<String, MemberObject>,
    /// Pending replicas per Model, from the last successful read.
    pending: BTreeMap<String, u32>,
}

/// One reachable cluster's share of a FederatedModel and the write it needs.
struct Decided {
    name: String,
    is_selected: bool,
    share: Option<u32>,
    desired: Option<Value>,
    act: Action,
    /// The member Model's replicas and Ready count, as read.
    asked: u32,
    ready: u32,
    /// The cluster's cap from Pending shortfalls, when it has one.
    cap: Option<u32>,
}

/// The controller's memory while it leads.
pub(crate) struct Controller {
    handle: ClusterHandle,
    config: FederationConfig,
    metrics: Metrics,
    clusters: BTreeMap<String, ClusterView>,
    shortfalls: BTreeMap<(String, String), Shortfall>,
}

impl Controller {
    pub(crate) fn new(handle: ClusterHandle, config: FederationConfig, metrics: Metrics) -> Controller {
        Controller { handle, config, metrics, clusters: BTreeMap::new(), shortfalls: BTreeMap::new() }
    }

    /// One pass over every Cluster and FederatedModel.
    pub(crate) async fn tick(&mut self) {
        let reader = self.handle.reader();
        let (clusters, _) = reader.list(Kind::Cluster, &LabelSelector::default());
        let (feds, _) = reader.list(Kind::FederatedModel, &LabelSelector::default());
        let (fed_adapters, _) = reader.list(Kind::FederatedAdapter, &LabelSelector::default());
        self.refresh_clusters(&clusters).await;
        let now = Instant::now();
        let mut fed_names = Vec::new();
        for fed in &feds {
            let Ok(spec) = serde_json::from_value::<FederatedModelSpec>(fed.spec.clone()) else {
                tracing::warn!(fed = %fed.key.name, "a FederatedModel whose stored spec does not parse; skipped");
                continue;
            };
            fed_names.push(fed.key.name.to_string());
            let status = self.reconcile_one(fed.key.name.as_str(), &spec, now).await;
            self.write_status(fed, status).await;
        }
        let mut adapter_names = Vec::new();
        for fa in &fed_adapters {
            let Ok(spec) = serde_json::from_value::<FederatedAdapterSpec>(fa.spec.clone()) else { continue };
            adapter_names.push(fa.key.name.to_string());
            let status = self.reconcile_adapter(fa.key.name.as_str(), &spec).await;
            self.write_status(fa, status).await;
        }
        self.delete_orphans(&fed_names, &adapter_names).await;
        for c in &clusters {
            let status = self.cluster_status(c.key.name.as_str());
            self.write_status(c, status).await;
        }
    }

    /// Reads every cluster's Models and Replicas, all at once.
    async fn refresh_clusters(&mut self, clusters: &[StoredObject]) {
        let now = Instant::now();
        let mut keep = BTreeMap::new();
        for c in clusters {
            let name = c.key.name.to_string();
            let Ok(spec) = serde_json::from_value::<ClusterSpec>(c.spec.clone()) else { continue };
            let view = match self.clusters.remove(&name) {
                Some(v) if v.spec == spec => ClusterView { labels: c.labels.clone(), ..v },
                _ => match Member::new(&spec, self.config.own_ca.as_deref()) {
                    Ok(member) => ClusterView {
                        spec,
                        labels: c.labels.clone(),
                        member: Arc::new(member),
                        reach: Reach::new(now),
                        since_unix_ms: flotilla_api::civil::unix_ms(),
                        error: String::new(),
                        models: BTreeMap::new(),
                        adapters: BTreeMap::new(),
                        pending: BTreeMap::new(),
                    },
                    Err(e) => {
                        tracing::warn!(cluster = %name, error = %e, "cannot set up the cluster's client");
                        continue;
                    }
                },
            };
            keep.insert(name, view);
        }
        let reads = keep.iter().map(|(name, v)| {
            let member = v.member.clone();
            let name = name.clone();
            async move {
                let read = async {
                    Ok::<_, CallError>((
                        member.list("model").await?,
                        member.list("adapter").await?,
                        member.list("replica").await?,
                    ))
                };
                (name, read.await)
            }
        });
        for (name, read) in futures::future::join_all(reads).await {
            let v = keep.get_mut(&name).expect("read for a kept cluster");
            let was = v.reach.reachable;
            match read {
                Ok((models, adapters, replicas)) => {
                    v.reach.observe(true, now);
                    v.error.clear();
                    v.models = models.iter().map(|o| (o.name.clone(), member_object(o))).collect();
                    v.adapters = adapters.iter().map(|o| (o.name.clone(), member_object(o))).collect();
                    v.pending = pending_by_model(&replicas);
                }
                Err(e) => {
                    v.reach.observe(false, now);
                    v.error = e.to_string();
                }
            }
            if was != v.reach.reachable {
                v.since_unix_ms = flotilla_api::civil::unix_ms();
                match v.reach.reachable {
                    true => tracing::info!(cluster = %name, "member cluster reachable again"),
                    false => tracing::warn!(cluster = %name, error = %v.error, "member cluster unreachable"),
                }
            }
            self.metrics.reachable(&name, v.reach.reachable);
        }
        self.clusters = keep;
    }

    /// Spreads one FederatedModel and brings each cluster's member Model to its share;
    /// returns its status.
    async fn reconcile_one(&mut self, fed: &str, spec: &FederatedModelSpec, now: Instant) -> Value {
        let grace = Duration::from_millis(spec.placement.grace.as_millis());
        let selector = spec.placement.clusters.as_deref().map(LabelSelector::parse).transpose().ok().flatten();
        let selected: Vec<String> = self
            .clusters
            .iter()
            .filter(|(_, v)| selector.as_ref().is_none_or(|s| s.matches(&v.labels)))
            .map(|(n, _)| n.clone())
            .collect();
        let mut candidates = Vec::new();
        for name in &selected {
            let v = &self.clusters[name];
            let shortfall = self.shortfalls.entry((fed.to_string(), name.clone())).or_default();
            if let (true, Some(m)) = (v.reach.reachable, v.models.get(fed)) {
                let pending = v.pending.get(fed).copied().unwrap_or(0);
                shortfall.observe(m.counts().0, pending, now, grace);
            }
            candidates.push(Candidate {
                name: name.clone(),
                available: v.reach.available(now, grace),
                capacity: shortfall.capacity(now),
            });
        }
        let policy = Policy {
            weights: spec.placement.weights.clone(),
            min: spec.placement.min.clone(),
            max: spec.placement.max.clone(),
            spillover: spec.placement.spillover.clone(),
        };
        let spread = placement::spread(spec.replicas, &candidates, &policy);

        // Every reachable cluster's action is decided first and the writes go out together,
        // so one change reaches N clusters in about one write's time rather than N.
        let mut rows = Vec::new();
        let (mut ready_total, mut placed) = (0u32, 0u32);
        let mut decided = Vec::new();
        for (name, v) in &self.clusters {
            let is_selected = selected.contains(name);
            let share = spread.counts.get(name).copied();
            let observed = v.models.get(fed);
            let (asked, ready) =
                observed.filter(|m| m.federated_by() == Some(fed)).map_or((0, 0), MemberObject::counts);
            let candidate = candidates.iter().find(|c| &c.name == name);
            if !v.reach.reachable {
                if is_selected {
                    let (state, message) = match candidate.is_some_and(|c| c.available) {
                        true => (
                            "Unreachable",
                            format!("within the grace ({}); its share stays: {}", spec.placement.grace, v.error),
                        ),
                        false => (
                            "Excluded",
                            format!("unreachable past the grace; its share moved to the others: {}", v.error),
                        ),
                    };
                    rows.push(row(name, share.unwrap_or(0), asked, ready, state, message));
                    placed += share.unwrap_or(0);
                }
                continue;
            }
            let desired = share.filter(|n| *n > 0).map(|n| member_spec(spec.member(name, n)));
            let act = reconcile::action(fed, desired.as_ref(), observed);
            let cap = candidate.and_then(|c| c.capacity);
            decided.push(Decided { name: name.clone(), is_selected, share, desired, act, asked, ready, cap });
        }
        let this = &*self;
        let writes = decided.iter().map(|d| async move {
            match &d.act {
                Action::Nothing | Action::Conflict(_) => None,
                act => Some(this.write_member(&d.name, MODEL, fed, d.desired.as_ref(), act).await),
            }
        });
        let written = futures::future::join_all(writes).await;
        for (d, written) in decided.into_iter().zip(written) {
            if !d.is_selected {
                continue;
            }
            let share = d.share.unwrap_or(0);
            placed += share;
            ready_total += d.ready;
            let (state, message) = match (written, d.act) {
                (Some(Ok(())), act) => ("Progressing", describe(&act, d.asked, share)),
                (Some(Err(e)), _) => ("Error", e.to_string()),
                (None, Action::Conflict(why)) => ("Conflict", why),
                (None, _) if d.ready < share => ("Progressing", format!("{} of {share} ready", d.ready)),
                (None, _) if d.cap.is_some() => (
                    "CapacityLimited",
                    format!("replicas stayed Pending past the grace: capped at {} for now", d.cap.unwrap_or(0)),
                ),
                (None, _) => ("Ready", String::new()),
            };
            rows.push(row(&d.name, share, d.asked, d.ready, state, message));
        }
        rows.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let mut message = format!("{ready_total}/{} ready in {} clusters", spec.replicas, rows.len());
        if spread.unplaced > 0 {
            message.push_str(&format!("; {} unplaced: no available cluster has room", spread.unplaced));
        }
        json!({
            "desired": spec.replicas,
            "placed": placed,
            "ready": ready_total,
            "unplaced": spread.unplaced,
            "clusters": rows,
            "message": message,
        })
    }

    /// Makes one change to cluster `name`'s member `kind` (Model, Adapter) of `fed`.
    async fn write_member(
        &self,
        name: &str,
        kind: &str,
        fed: &str,
        desired: Option<&Value>,
        act: &Action,
    ) -> Result<(), CallError> {
        let member = &self.clusters[name].member;
        let result = match (act, desired) {
            (Action::Create, Some(spec)) => member.apply(&reconcile::manifest(kind, fed, fed, spec), 0).await,
            (Action::Update { revision }, Some(spec)) => {
                member.apply(&reconcile::manifest(kind, fed, fed, spec), *revision).await
            }
            (Action::Delete { revision }, _) => member.delete(kind, fed, *revision).await,
            _ => Ok(()),
        };
        let what = match act {
            Action::Create => "create",
            Action::Update { .. } => "update",
            _ => "delete",
        };
        self.metrics.member_write(name, what, result.is_ok());
        match &result {
            Ok(()) => tracing::info!(cluster = %name, kind, fed, what, "member written"),
            Err(e) => tracing::warn!(cluster = %name, kind, fed, what, error = %e, "member write failed"),
        }
        result
    }

    /// Deletes member Models and Adapters whose federated object no longer exists.
    async fn delete_orphans(&self, feds: &[String], fed_adapters: &[String]) {
        for (name, v) in &self.clusters {
            if !v.reach.reachable {
                continue;
            }
            for (kind, members, owners) in [(ADAPTER, &v.adapters, fed_adapters), (MODEL, &v.models, feds)] {
                for (object, m) in members {
                    let Some(owner) = m.federated_by() else { continue };
                    if owner == object && !owners.iter().any(|f| f == owner) {
                        let act = Action::Delete { revision: m.revision };
                        let _ = self.write_member(name, kind, owner, None, &act).await;
                    }
                }
            }
        }
    }

    /// Keeps a FederatedAdapter's member Adapter in every reachable cluster that runs its base
    /// FederatedModel's member Model (and in no other); returns its status.
    async fn reconcile_adapter(&self, fed: &str, spec: &FederatedAdapterSpec) -> Value {
        let base = spec.template.base_model.as_str();
        let desired = flotilla_api::spec::Spec::Adapter(spec.template.clone()).to_json();
        // As for Models: decide every reachable cluster's action, then write them together.
        let mut rows = Vec::new();
        let mut steps = Vec::new();
        for (name, v) in &self.clusters {
            if !v.reach.reachable {
                if v.adapters.get(fed).is_some_and(|a| a.federated_by() == Some(fed)) {
                    rows.push(json!({"name": name, "state": "Unreachable", "message": v.error}));
                }
                continue;
            }
            let runs_base = v.models.get(base).is_some_and(|m| m.federated_by() == Some(base));
            let observed = v.adapters.get(fed);
            let phase = observed.map(|a| a.status["phase"].as_str().unwrap_or("Pending").to_string());
            let act = reconcile::action(fed, runs_base.then_some(&desired), observed);
            steps.push((name, runs_base, phase.unwrap_or_default(), act));
        }
        let desired = &desired;
        let writes = steps.iter().map(|(name, runs_base, _, act)| async move {
            match act {
                Action::Nothing | Action::Conflict(_) => None,
                act => Some(self.write_member(name, ADAPTER, fed, runs_base.then_some(desired), act).await),
            }
        });
        let written = futures::future::join_all(writes).await;
        let mut kept = 0;
        for ((name, runs_base, phase, act), written) in steps.into_iter().zip(written) {
            let (state, message) = match (written, act) {
                (Some(Ok(())), _) if runs_base => ("Progressing", "written".to_string()),
                (Some(Ok(())), _) => continue,
                (Some(Err(e)), _) => ("Error", e.to_string()),
                (None, Action::Conflict(why)) => ("Conflict", why),
                (None, _) if runs_base => ("Ready", phase),
                (None, _) => continue,
            };
            kept += usize::from(runs_base);
            rows.push(json!({"name": name, "state": state, "message": message}));
        }
        rows.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        json!({
            "clusters": rows,
            "message": format!("kept in {kept} clusters running FederatedModel {base:?}"),
        })
    }

    fn cluster_status(&self, name: &str) -> Value {
        let Some(v) = self.clusters.get(name) else {
            return json!({"reachable": false, "message": "the Cluster's spec cannot be used (see the server's log)"});
        };
        let federated = v.models.values().filter(|m| m.federated_by().is_some()).count();
        json!({
            "reachable": v.reach.reachable,
            "since_ms": v.since_unix_ms,
            "federated_models": federated,
            "message": v.error,
        })
    }

    /// Writes `status` to `object` if it differs from what it holds (compare-and-set on the
    /// revision read, so a concurrent apply wins and the next tick writes again).
    async fn write_status(&self, object: &StoredObject, status: Value) {
        if object.status == status {
            return;
        }
        let cmd = Command::PutStatus {
            key: ObjectKey { kind: object.key.kind, name: object.key.name.clone() },
            status,
            expected_revision: Some(object.revision),
        };
        if let Err(e) = self.handle.propose(cmd).await {
            tracing::debug!(object = %object.key, error = %e, "status not written; next tick");
        }
    }
}

fn row(name: &str, desired: u32, replicas: u32, ready: u32, state: &str, message: String) -> Value {
    json!({"name": name, "desired": desired, "replicas": replicas, "ready": ready, "state": state, "message": message})
}

fn describe(act: &Action, from: u32, to: u32) -> String {
    match act {
        Action::Create => format!("created with {to} replicas"),
        Action::Update { .. } if from != to => format!("scaled {from} → {to}"),
        Action::Update { .. } => "spec updated".into(),
        _ => "deleted".into(),
    }
}

/// The canonical JSON a member cluster stores for `spec` (what its apply writes).
fn member_spec(spec: ModelSpec) -> Value {
    flotilla_api::spec::Spec::Model(spec).to_json()
}

/// The member kinds, as the member's API names them.
const MODEL: &str = "Model";
const ADAPTER: &str = "Adapter";

fn member_object(o: &flotilla_api::pb::Object) -> MemberObject {
    MemberObject {
        labels: o.labels.clone().into_iter().collect(),
        spec: serde_json::from_str(&o.spec_json).unwrap_or_default(),
        status: serde_json::from_str(&o.status_json).unwrap_or_default(),
        revision: o.revision,
    }
}

/// Pending replicas per Model among a cluster's Replicas.
fn pending_by_model(replicas: &[flotilla_api::pb::Object]) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for r in replicas {
        let status: Value = serde_json::from_str(&r.status_json).unwrap_or_default();
        if status["phase"].as_str().unwrap_or("Pending") == "Pending" {
            let spec: Value = serde_json::from_str(&r.spec_json).unwrap_or_default();
            if let Some(model) = spec["model"].as_str() {
                *out.entry(model.to_string()).or_insert(0) += 1;
            }
        }
    }
    out
}
