//! The [`Directory`]: everything discovery writes and requests read, as cheap `Arc`
//! snapshots — the published endpoint table, the watched `Model` ([`ModelInfo`]), `Tenant`
//! and `Adapter` objects. A cluster snapshot is published with the gateway's own adapter
//! knowledge laid over it ([`Overlay`]) and never emptied because the servers are gone
//! ([`carry_over`]). Every change to the table or the watched models bumps a generation
//! ([`Directory::changes`]) that releases requests held for a model without endpoints
//! (`hold`). Every published table also sets the certificate pins the upstream client
//! accepts ([`Directory::pins`]): an endpoint's pin lives exactly as long as it is routable.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use flotilla_api::spec::RoutingStrategy;
use flotilla_engine::EnginePins;
use tokio::sync::watch;

use super::{Endpoint, EndpointId, EndpointSet, Tenants};
use crate::lora::{AdapterInfo, Overlay, OVERLAY_TTL};
use crate::names::{AdapterName, ModelName};

/// A watched `Model` object as the gateway needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelInfo {
    /// The spec's routing strategy.
    pub routing: RoutingStrategy,
    /// The status's `desired_replicas` as the leader wrote it (None: not written yet).
    pub desired_replicas: Option<u32>,
    /// The rollout's running canary, if any (`status.rollout.canary`).
    pub canary: Option<crate::canary::Canary>,
    /// `engine: sim`: its prompts are keyed with the sim's tokenizer (`kv-aware`).
    pub sim_engine: bool,
    /// A disaggregated model (`spec.disaggregation`): its decider; its pools are its member
    /// models ([`crate::pd`]).
    pub pd: Option<flotilla_api::spec::PdDecider>,
    /// The spec's `source` (where its tokenizer files are fetched from, [`crate::source_tokenizers`]).
    pub source: Option<std::sync::Arc<str>>,
}

impl ModelInfo {
    /// The leader scaled the model to zero on purpose (`status.desired_replicas: 0`).
    pub fn scaled_to_zero(&self) -> bool {
        self.desired_replicas == Some(0)
    }
}

/// Static stability across control-plane updates: a model that still exists but whose
/// every endpoint vanished from one snapshot keeps its previous endpoints for up to
/// `grace` (recorded in `held`, per model, from the first snapshot without them). A node the
/// leader lost contact with (a partition, an agent restart) has its replicas rescheduled
/// break-before-make, yet its engines usually still serve; dropping them all at once
/// turned every such reschedule into a model-wide outage until the replacements were Ready.
/// Engines that really died are ejected by failed requests as always. A deleted model
/// (absent from `models`) loses its endpoints at once, and so does a model the leader scaled
/// to zero on purpose ([`ModelInfo::scaled_to_zero`]): its engines are being stopped, and
/// its requests are better held (asking for a scale-up) than sent there. Pure.
pub fn carry_over(
    prev: &EndpointSet,
    mut next: EndpointSet,
    models: &HashMap<ModelName, ModelInfo>,
    held: &mut HashMap<ModelName, tokio::time::Instant>,
    now: tokio::time::Instant,
    grace: std::time::Duration,
) -> EndpointSet {
    let keeps = |m: &str| models.get(m).is_some_and(|i| !i.scaled_to_zero());
    held.retain(|m, _| next.by_model.get(m).is_none_or(|v| v.is_empty()) && keeps(m.as_str()));
    for (model, eps) in &prev.by_model {
        if eps.is_empty() || next.by_model.get(model).is_some_and(|v| !v.is_empty()) || !keeps(model.as_str()) {
            continue;
        }
        let since = *held.entry(model.clone()).or_insert(now);
        if now.saturating_duration_since(since) < grace {
            next.by_model.insert(model.clone(), eps.clone());
        }
    }
    next
}

/// How long a model's last endpoints are kept after a snapshot without any ([`carry_over`]).
pub const STALE_ENDPOINT_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// The cluster-fed table before the gateway's own knowledge is laid over it.
#[derive(Debug, Default)]
struct ClusterView {
    /// The last snapshot after [`carry_over`].
    raw: Arc<EndpointSet>,
    /// Models whose endpoints are carried over, and since when ([`carry_over`]).
    held: HashMap<ModelName, tokio::time::Instant>,
    /// Adapters just loaded or found unloaded by this gateway ([`Overlay`]).
    overlay: Overlay,
}

/// Everything discovery writes and requests read.
#[derive(Debug, Default)]
pub struct Directory {
    cluster: std::sync::Mutex<ClusterView>,
    endpoints: RwLock<Arc<EndpointSet>>,
    /// The watched `Model` objects by name.
    models: RwLock<Arc<HashMap<ModelName, ModelInfo>>>,
    tenants: RwLock<Arc<Tenants>>,
    adapters: RwLock<Arc<HashMap<AdapterName, AdapterInfo>>>,
    /// Set once any endpoint table was received.
    synced: std::sync::atomic::AtomicBool,
    /// Set once the watched `Adapter` objects were listed (see `ownership::Named`).
    adapters_listed: std::sync::atomic::AtomicBool,
    /// Set once the watched `Model` and `Tenant` objects were listed.
    models_listed: std::sync::atomic::AtomicBool,
    tenants_listed: std::sync::atomic::AtomicBool,
    /// Bumped on every published table and every change of the watched models.
    changes: watch::Sender<u64>,
    /// The pins of the published table's TLS engines.
    pins: EnginePins,
}

impl Directory {
    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.endpoints.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn set_endpoints(&self, set: EndpointSet) {
        self.install(Arc::new(set));
    }
    fn install(&self, set: Arc<EndpointSet>) {
        self.pins.replace(set.pins());
        *self.endpoints.write().unwrap_or_else(|e| e.into_inner()) = set;
        self.synced.store(true, std::sync::atomic::Ordering::Release);
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }
    /// The certificates the upstream client accepts: those of the published table's
    /// endpoints, per host, replaced with every table.
    pub fn pins(&self) -> &EnginePins {
        &self.pins
    }
    /// A receiver that sees a change whenever the table or the watched models change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
    fn view(&self) -> std::sync::MutexGuard<'_, ClusterView> {
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Publishes the raw snapshot with the overlay applied (the caller holds the view).
    fn publish(&self, view: &mut ClusterView) {
        match view.overlay.apply(&view.raw, tokio::time::Instant::now()) {
            Some(set) => self.install(Arc::new(set)),
            None => self.install(view.raw.clone()),
        }
    }
    /// Installs a snapshot from the control plane, carrying over the last endpoints of a
    /// model that lost them all ([`carry_over`]) and laying the [`Overlay`] over it.
    pub fn set_cluster_endpoints(&self, set: EndpointSet) {
        let models = self.models();
        let mut view = self.view();
        let view = &mut *view;
        let next =
            carry_over(&view.raw, set, &models, &mut view.held, tokio::time::Instant::now(), STALE_ENDPOINT_GRACE);
        if !view.held.is_empty() {
            tracing::warn!(models = ?view.held.keys().collect::<Vec<_>>(), "no endpoints in the latest snapshot; keeping the last ones");
        }
        view.raw = Arc::new(next);
        self.publish(view);
    }
    /// `EnsureLoaded` answered: `adapter` is loaded on `eps` (until a snapshot says so too,
    /// for at most [`OVERLAY_TTL`]). For cluster endpoints only.
    pub fn learn_loaded(&self, adapter: &AdapterName, eps: Vec<Endpoint>) {
        let mut view = self.view();
        view.overlay.learn(adapter, eps, tokio::time::Instant::now() + OVERLAY_TTL);
        self.publish(&mut view);
    }
    /// An engine answered 404 for `adapter`: it was unloaded there; route it elsewhere for
    /// [`OVERLAY_TTL`] (or until `EnsureLoaded` names that endpoint again). For cluster
    /// endpoints only.
    pub fn forget_loaded(&self, adapter: &AdapterName, id: &EndpointId) {
        let mut view = self.view();
        view.overlay.forget(adapter, id, tokio::time::Instant::now() + OVERLAY_TTL);
        self.publish(&mut view);
    }
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }
    pub fn routing_of(&self, model: &str) -> RoutingStrategy {
        self.model(model).map(|m| m.routing).unwrap_or_default()
    }
    /// The running canary of `model`, if any.
    pub fn canary_of(&self, model: &str) -> Option<crate::canary::Canary> {
        self.model(model).and_then(|m| m.canary)
    }
    /// The watched `Model` objects.
    pub fn models(&self) -> Arc<HashMap<ModelName, ModelInfo>> {
        self.models.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// The watched `Model` object `name`, if it exists.
    pub fn model(&self, name: &str) -> Option<ModelInfo> {
        self.models.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }
    /// Installs the watched `Model` objects. A model whose endpoints are being carried over
    /// ([`carry_over`]) and that was deleted or scaled to zero loses them now.
    pub fn set_models(&self, m: HashMap<ModelName, ModelInfo>) {
        let keeps = |name: &str| m.get(name).is_some_and(|i| !i.scaled_to_zero());
        let mut view = self.view();
        let drop: Vec<ModelName> = view.held.keys().filter(|k| !keeps(k.as_str())).cloned().collect();
        *self.models.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(m);
        self.models_listed.store(true, std::sync::atomic::Ordering::Release);
        if drop.is_empty() {
            self.changes.send_modify(|g| *g = g.wrapping_add(1));
            return;
        }
        tracing::info!(models = ?drop, "model deleted or scaled to zero; dropping its carried-over endpoints");
        let mut raw = EndpointSet { by_model: view.raw.by_model.clone() };
        for k in &drop {
            view.held.remove(k);
            raw.by_model.remove(k);
        }
        view.raw = Arc::new(raw);
        self.publish(&mut view);
    }
    pub fn tenants(&self) -> Arc<Tenants> {
        self.tenants.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn set_tenants(&self, t: Tenants) {
        *self.tenants.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(t);
        self.tenants_listed.store(true, std::sync::atomic::Ordering::Release);
    }
    /// The watched `Adapter` objects by name.
    pub fn adapters(&self) -> Arc<HashMap<AdapterName, AdapterInfo>> {
        self.adapters.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn adapter(&self, name: &str) -> Option<AdapterInfo> {
        self.adapters.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }
    pub fn set_adapters(&self, a: HashMap<AdapterName, AdapterInfo>) {
        *self.adapters.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(a);
        self.adapters_listed.store(true, std::sync::atomic::Ordering::Release);
    }
    /// The watched `Adapter` objects were received at least once.
    pub fn adapters_listed(&self) -> bool {
        self.adapters_listed.load(std::sync::atomic::Ordering::Acquire)
    }
    /// The first full view of the cluster arrived: an endpoint table and, when `objects`
    /// (the gateway follows servers), the `Model`, `Tenant` and `Adapter` lists.
    pub fn first_view(&self, objects: bool) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        self.synced()
            && (!objects
                || (self.models_listed.load(Acquire)
                    && self.tenants_listed.load(Acquire)
                    && self.adapters_listed.load(Acquire)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::test_endpoint as ep;

    #[test]
    fn a_model_that_lost_every_endpoint_keeps_them_for_the_grace_only_while_it_exists() {
        let t0 = tokio::time::Instant::now();
        let grace = std::time::Duration::from_secs(60);
        let set = |eps: &[(&str, &str)]| EndpointSet::from_endpoints(eps.iter().map(|(m, a)| ep(m, a, &[])));
        let models: HashMap<ModelName, ModelInfo> =
            ["a", "b"].iter().map(|m| (ModelName::new(m), ModelInfo::default())).collect();
        let mut held = HashMap::new();
        let prev = set(&[("a", "1.1.1.1:1"), ("b", "2.2.2.2:1")]);
        // b keeps one endpoint: no carry-over; a lost all: kept.
        let next = carry_over(&prev, set(&[("b", "2.2.2.2:2")]), &models, &mut held, t0, grace);
        assert_eq!(next.by_model["a"][0].authority.as_str(), "1.1.1.1:1");
        assert_eq!(next.by_model["b"].len(), 1);
        assert_eq!(next.by_model["b"][0].authority.as_str(), "2.2.2.2:2");
        // still none 59 s later: still kept; at 60 s: dropped.
        let again = carry_over(&next, set(&[]), &models, &mut held, t0 + grace / 60 * 59, grace);
        assert!(again.by_model.contains_key("a"));
        let later = carry_over(&again, set(&[]), &models, &mut held, t0 + grace, grace);
        assert!(!later.by_model.contains_key("a"), "held past the grace");
        // endpoints back: the hold ends; a deleted model is dropped at once.
        let back = carry_over(&later, set(&[("a", "1.1.1.1:3")]), &models, &mut held, t0 + grace, grace);
        assert!(!held.contains_key("a") && back.by_model["a"].len() == 1);
        let gone: HashMap<ModelName, ModelInfo> = HashMap::new();
        let deleted = carry_over(&back, set(&[]), &gone, &mut held, t0 + grace, grace);
        assert!(deleted.by_model.is_empty() && held.is_empty());
    }

    #[test]
    fn the_first_view_needs_the_table_and_when_following_servers_every_object_list() {
        let dir = Directory::default();
        assert!(!dir.first_view(false) && !dir.first_view(true), "nothing yet");
        dir.set_endpoints(EndpointSet::default());
        assert!(dir.first_view(false), "an empty table is a table");
        assert!(!dir.first_view(true), "the object lists are missing");
        dir.set_models(HashMap::new());
        dir.set_tenants(Tenants::default());
        assert!(!dir.first_view(true), "the adapters are missing");
        dir.set_adapters(HashMap::new());
        assert!(dir.first_view(true));
    }

    #[test]
    fn a_model_scaled_to_zero_on_purpose_is_not_carried_over() {
        let t0 = tokio::time::Instant::now();
        let grace = std::time::Duration::from_secs(60);
        let set = |eps: &[(&str, &str)]| EndpointSet::from_endpoints(eps.iter().map(|(m, a)| ep(m, a, &[])));
        let info = |desired| ModelInfo { desired_replicas: desired, ..ModelInfo::default() };
        let mut models: HashMap<ModelName, ModelInfo> =
            [("a".into(), info(Some(0))), ("b".into(), info(Some(2))), ("c".into(), info(None))].into_iter().collect();
        let mut held = HashMap::new();
        let prev = set(&[("a", "1.1.1.1:1"), ("b", "2.2.2.2:1"), ("c", "3.3.3.3:1")]);
        // a (desired 0) is dropped at once; b (desired 2) and c (no status yet) are kept.
        let next = carry_over(&prev, set(&[]), &models, &mut held, t0, grace);
        assert!(!next.by_model.contains_key("a"), "scaled to zero: no carry-over");
        assert_eq!(next.by_model["b"][0].authority.as_str(), "2.2.2.2:1");
        assert_eq!(next.by_model["c"][0].authority.as_str(), "3.3.3.3:1");
        assert!(!held.contains_key("a") && held.contains_key("b") && held.contains_key("c"));
        // b is scaled to zero while carried over: the next snapshot drops it.
        models.insert("b".into(), info(Some(0)));
        let next = carry_over(&next, set(&[]), &models, &mut held, t0 + grace / 2, grace);
        assert!(!next.by_model.contains_key("b") && !held.contains_key("b"));
        assert!(next.by_model.contains_key("c"));
        // endpoints of a model at desired 0 that are still in the snapshot are kept as they are.
        let still = carry_over(&next, set(&[("a", "1.1.1.1:1")]), &models, &mut held, t0, grace);
        assert_eq!(still.by_model["a"].len(), 1);
    }

    #[test]
    fn the_pins_follow_the_published_table() {
        let dir = Directory::default();
        let pinned = |addr: &str, b: u8| {
            let mut e = ep("a", addr, &[]);
            e.cert = Some(format!("{b:02x}").repeat(32).parse().unwrap());
            e
        };
        let fp = |b: u8| format!("{b:02x}").repeat(32).parse::<flotilla_engine::CertFingerprint>().unwrap();
        dir.set_models([("a".into(), ModelInfo::default())].into_iter().collect());
        dir.set_cluster_endpoints(EndpointSet::from_endpoints([pinned("10.0.0.1:1", 1), pinned("10.0.0.2:1", 2)]));
        assert!(dir.pins().allows("10.0.0.1", &fp(1)) && dir.pins().allows("10.0.0.2", &fp(2)));
        assert!(!dir.pins().allows("10.0.0.1", &fp(2)), "a pin holds for its own host only");
        dir.set_cluster_endpoints(EndpointSet::from_endpoints([pinned("10.0.0.2:1", 3)]));
        assert!(!dir.pins().allows("10.0.0.1", &fp(1)), "a removed endpoint loses its pin");
        assert!(!dir.pins().allows("10.0.0.2", &fp(2)) && dir.pins().allows("10.0.0.2", &fp(3)), "a new pin replaces");
        dir.set_cluster_endpoints(EndpointSet::default());
        assert!(dir.pins().allows("10.0.0.2", &fp(3)), "carried over with its endpoint");
    }

    #[test]
    fn the_directory_drops_carried_endpoints_when_the_model_is_scaled_to_zero() {
        let dir = Directory::default();
        let mut rx = dir.changes();
        let info = |desired| ModelInfo { desired_replicas: desired, ..ModelInfo::default() };
        dir.set_models([("a".into(), info(Some(1)))].into_iter().collect());
        dir.set_cluster_endpoints(EndpointSet::from_endpoints([ep("a", "1.1.1.1:1", &[])]));
        dir.set_cluster_endpoints(EndpointSet::default());
        assert_eq!(dir.endpoints().len(), 1, "carried over");
        rx.borrow_and_update();
        dir.set_models([("a".into(), info(Some(0)))].into_iter().collect());
        assert!(dir.endpoints().is_empty(), "scaled to zero: dropped at once");
        assert!(rx.has_changed().unwrap(), "the change is announced");
    }
}
