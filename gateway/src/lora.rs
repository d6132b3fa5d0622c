//! LoRA adapters as the gateway sees them, pure: the watched `Adapter` objects (name →
//! base model, phase, reason), the `/v1/models` listing, the [`Overlay`] that lays what
//! the gateway learned itself over the control plane's endpoint snapshots, and the bounded
//! [`UsageBook`] reported to the leader. The I/O around them is in `ondemand`.
//!
//! ```text
//! WatchEndpoints snapshot ──carry_over──> raw ──Overlay::apply──> published table
//!   EnsureLoaded answer ──learn (adapter on endpoint, 10 s)──┘ │
//!   engine 404 on an adapter ──forget (adapter off endpoint, 10 s)┘
//! ```
//!
//! Why an overlay: the snapshot that follows a load may have been built before it (the
//! leader re-sends on membership changes, and load figures and adapters every few
//! seconds), and one built before an eviction may arrive after the engine already answers
//! 404. Both are bridged for [`OVERLAY_TTL`]; whatever the overlay gets wrong costs one
//! 404 and one retry, never a failed request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::pb;
use flotilla_api::spec::AdapterPhase;
use tokio::time::Instant;

use crate::names::{AdapterName, ModelName, ServedName};
use crate::ownership::Owners;
use crate::table::{Endpoint, EndpointId, EndpointSet};

/// How long the gateway's own knowledge of an adapter on an endpoint outlives the
/// snapshots that do not (yet) show it.
pub const OVERLAY_TTL: Duration = Duration::from_secs(10);

/// Most (adapter, engine) pairs counted between two usage reports; further pairs are
/// dropped until the next report.
pub const MAX_USAGE_KEYS: usize = 4096;

/// A watched `Adapter` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    pub base_model: ModelName,
    pub phase: AdapterPhase,
    /// Why it is Failed (or not loaded), from its status.
    pub reason: String,
    /// The tenants that may use it (`spec.tenants`; see `ownership`).
    pub owners: Owners,
}

/// Reads an `Adapter` object's spec and status leniently (unknown fields are fine: the
/// gateway needs only the base model, phase, reason and owners). None without a base
/// model.
pub fn adapter_info(spec_json: &str, status_json: &str) -> Option<AdapterInfo> {
    let spec: serde_json::Value = serde_json::from_str(spec_json).ok()?;
    let base_model = ModelName::new(spec.get("base_model")?.as_str().filter(|s| !s.is_empty())?);
    let owners = Owners::of_spec(&spec);
    let status: serde_json::Value = serde_json::from_str(status_json).unwrap_or_default();
    let phase = status.get("phase").and_then(|p| serde_json::from_value(p.clone()).ok()).unwrap_or_default();
    let reason = status.get("reason").and_then(|r| r.as_str()).unwrap_or_default().to_string();
    Some(AdapterInfo { base_model, phase, reason, owners })
}

/// `(id, parent)` for `/v1/models`: the table's models, then every adapter, loaded
/// somewhere or only declared by an `Adapter` object, with its base model as parent.
pub fn listing(
    set: &EndpointSet,
    adapters: &HashMap<AdapterName, AdapterInfo>,
) -> Vec<(ServedName, Option<ModelName>)> {
    let mut out = set.listing();
    let split = out.iter().position(|(_, p)| p.is_some()).unwrap_or(out.len());
    let mut extra: Vec<(ServedName, Option<ModelName>)> = adapters
        .iter()
        .filter(|(name, _)| {
            !set.by_model.contains_key(name.as_str()) && !out[split..].iter().any(|(n, _)| n == name.as_str())
        })
        .map(|(name, a)| (ServedName::from(name), Some(a.base_model.clone())))
        .collect();
    if extra.is_empty() {
        return out;
    }
    extra.extend(out.drain(split..));
    extra.sort();
    out.extend(extra);
    out
}

/// What the gateway learned about adapters ahead of the snapshots (see the module docs).
#[derive(Debug, Default)]
pub struct Overlay {
    /// (adapter, endpoint) → the endpoint as `EnsureLoaded` named it, and until when.
    loaded: HashMap<(AdapterName, EndpointId), (Endpoint, Instant)>,
    /// (adapter, endpoint) → until when the adapter is hidden there.
    unloaded: HashMap<(AdapterName, EndpointId), Instant>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty() && self.unloaded.is_empty()
    }

    /// `adapter` is loaded on `eps` (cancels an earlier [`Overlay::forget`] there).
    pub fn learn(&mut self, adapter: &AdapterName, eps: impl IntoIterator<Item = Endpoint>, until: Instant) {
        for e in eps {
            let key = (adapter.clone(), e.id.clone());
            self.unloaded.remove(&key);
            self.loaded.insert(key, (e, until));
        }
    }

    /// `adapter` is not on `id` any more.
    pub fn forget(&mut self, adapter: &AdapterName, id: &EndpointId, until: Instant) {
        let key = (adapter.clone(), id.clone());
        self.loaded.remove(&key);
        self.unloaded.insert(key, until);
    }

    /// Drops expired entries and lays the rest over `raw`; None when nothing is left to lay.
    pub fn apply(&mut self, raw: &EndpointSet, now: Instant) -> Option<EndpointSet> {
        self.loaded.retain(|_, (_, until)| *until > now);
        self.unloaded.retain(|_, until| *until > now);
        if self.is_empty() {
            return None;
        }
        let mut by_model = raw.by_model.clone();
        for ((adapter, id), (learned, _)) in &self.loaded {
            let eps = by_model.entry(learned.model.clone()).or_default();
            match eps.iter_mut().find(|e| e.id == *id) {
                Some(e) if e.adapters.contains(adapter) => {}
                Some(e) => Arc::make_mut(e).adapters.push(adapter.clone()),
                None => {
                    let mut e = learned.clone();
                    if !e.adapters.contains(adapter) {
                        e.adapters.push(adapter.clone());
                    }
                    eps.push(Arc::new(e));
                    eps.sort_by(|a, b| a.id.cmp(&b.id));
                }
            }
        }
        for (adapter, id) in self.unloaded.keys() {
            for eps in by_model.values_mut() {
                for e in eps.iter_mut().filter(|e| e.id == *id && e.adapters.contains(adapter)) {
                    Arc::make_mut(e).adapters.retain(|a| a != adapter);
                }
            }
        }
        Some(EndpointSet { by_model })
    }
}

/// Requests per (adapter, engine address) since the last report, bounded by
/// [`MAX_USAGE_KEYS`], and the requests in flight now per pair (the leader never evicts
/// an adapter with requests in flight). `changed` says a pair started or stopped having
/// requests in flight since the last report: the leader should hear of it at once.
#[derive(Debug, Default)]
pub struct UsageBook {
    counts: HashMap<(AdapterName, String), u32>,
    in_flight: HashMap<(AdapterName, String), u32>,
    changed: bool,
}

impl UsageBook {
    /// A request for `adapter` on `address` starts; true when it is the pair's first in
    /// flight (a change to report now).
    pub fn begin(&mut self, adapter: &AdapterName, address: &str) -> bool {
        let n = self.in_flight.entry((adapter.clone(), address.to_string())).or_insert(0);
        *n = n.saturating_add(1);
        let first = *n == 1;
        self.changed |= first;
        first
    }

    /// A request begun with [`UsageBook::begin`] ends; true when it was the pair's last.
    pub fn end(&mut self, adapter: &AdapterName, address: &str) -> bool {
        let key = (adapter.clone(), address.to_string());
        let Some(n) = self.in_flight.get_mut(&key) else { return false };
        *n = n.saturating_sub(1);
        if *n > 0 {
            return false;
        }
        self.in_flight.remove(&key);
        self.changed = true;
        true
    }

    /// Whether a report is due before the next tick: an in-flight change to tell.
    pub fn urgent(&self) -> bool {
        self.changed
    }

    /// Whether anything is in flight (then a report goes every tick, as a keep-alive).
    pub fn busy(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Counts one request; false when the book is full and the pair is new (dropped).
    pub fn record(&mut self, adapter: &AdapterName, address: &str) -> bool {
        if let Some(n) = self.counts.get_mut(&(adapter.clone(), address.to_string())) {
            *n = n.saturating_add(1);
            return true;
        }
        if self.counts.len() >= MAX_USAGE_KEYS {
            return false;
        }
        self.counts.insert((adapter.clone(), address.to_string()), 1);
        true
    }

    /// Everything counted, with every pair in flight (even without new requests), in a
    /// stable order; the counts restart from zero.
    pub fn take(&mut self) -> Vec<pb::AdapterUsage> {
        self.changed = false;
        let mut counts = std::mem::take(&mut self.counts);
        for key in self.in_flight.keys() {
            counts.entry(key.clone()).or_insert(0);
        }
        let mut v: Vec<pb::AdapterUsage> = counts
            .into_iter()
            .map(|((adapter, address), requests)| {
                let in_flight = self.in_flight.get(&(adapter.clone(), address.clone())).copied().unwrap_or(0);
                pb::AdapterUsage { adapter: adapter.to_string(), address, requests, in_flight }
            })
            .collect();
        v.sort_by(|a, b| (&a.adapter, &a.address).cmp(&(&b.adapter, &b.address)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::test_endpoint as ep;

    fn holders(set: &EndpointSet, adapter: &str) -> Vec<String> {
        set.resolve(adapter).map(|r| r.endpoints.iter().map(|e| e.id.to_string()).collect()).unwrap_or_default()
    }

    #[test]
    fn adapter_objects_are_read_leniently() {
        let a = adapter_info(
            r#"{"base_model":"llama","source":"sim://a","future":1}"#,
            r#"{"phase":"Failed","reason":"bad rank","desired_replicas":0,"loaded_replicas":0,"new":true}"#,
        )
        .unwrap();
        assert_eq!(
            a,
            AdapterInfo {
                base_model: "llama".into(),
                phase: AdapterPhase::Failed,
                reason: "bad rank".into(),
                owners: Owners::Anyone
            }
        );
        let owned = adapter_info(r#"{"base_model":"llama","tenants":["a"]}"#, "{}").unwrap();
        assert_eq!(owned.owners, Owners::Only(vec!["a".to_string()].into()));
        let b = adapter_info(r#"{"base_model":"llama"}"#, "{}").unwrap();
        assert_eq!((b.phase, b.reason.as_str()), (AdapterPhase::Pending, ""));
        assert!(adapter_info(r#"{"source":"sim://a"}"#, "{}").is_none());
        assert!(adapter_info("not json", "{}").is_none());
    }

    #[test]
    fn the_listing_has_declared_and_loaded_adapters_with_their_parent() {
        let set = EndpointSet::from_endpoints([ep("base", "a:1", &["sql", "seen"]), ep("other", "b:1", &[])]);
        let info = |b: &str| AdapterInfo {
            base_model: b.into(),
            phase: AdapterPhase::Pending,
            reason: String::new(),
            owners: Owners::Anyone,
        };
        let adapters: HashMap<AdapterName, AdapterInfo> = [
            ("sql".into(), info("base")),
            ("cold".into(), info("base")),
            ("other".into(), info("base")), // a model's name wins
        ]
        .into_iter()
        .collect();
        let got = listing(&set, &adapters);
        let p = |s: &str| Some(ModelName::new(s));
        assert_eq!(
            got,
            vec![
                ("base".into(), None),
                ("other".into(), None),
                ("cold".into(), p("base")),
                ("seen".into(), p("base")),
                ("sql".into(), p("base")),
            ]
        );
        assert_eq!(listing(&set, &HashMap::new()), set.listing());
    }

    #[test]
    fn the_overlay_adds_loads_hides_unloads_and_expires() {
        let t0 = Instant::now();
        let raw = EndpointSet::from_endpoints([ep("base", "a:1", &["x"]), ep("base", "b:1", &[])]);
        let mut o = Overlay::default();
        assert!(o.apply(&raw, t0).is_none(), "nothing to lay");
        // a load on b (known) and on c (a replica the snapshot does not have yet)
        let mut c = ep("base", "c:1", &[]);
        c.replica = "r-c".into();
        o.learn(&"y".into(), [ep("base", "b:1", &["y"]), c], t0 + OVERLAY_TTL);
        let set = o.apply(&raw, t0).unwrap();
        assert_eq!(holders(&set, "y"), ["b:1", "c:1"]);
        assert_eq!(set.by_model["base"].iter().find(|e| e.id.as_str() == "c:1").unwrap().replica, "r-c");
        assert_eq!(holders(&set, "x"), ["a:1"], "others untouched");
        // a 404 for x on a hides it; learning it there again shows it
        o.forget(&"x".into(), &EndpointId::new("a:1"), t0 + OVERLAY_TTL);
        assert!(o.apply(&raw, t0).unwrap().resolve("x").is_none());
        o.learn(&"x".into(), [ep("base", "a:1", &["x"])], t0 + OVERLAY_TTL);
        assert_eq!(holders(&o.apply(&raw, t0).unwrap(), "x"), ["a:1"]);
        // a forget removes a learned load too
        o.forget(&"y".into(), &EndpointId::new("c:1"), t0 + OVERLAY_TTL);
        assert_eq!(holders(&o.apply(&raw, t0).unwrap(), "y"), ["b:1"]);
        // everything expires
        assert!(o.apply(&raw, t0 + OVERLAY_TTL).is_none());
        assert!(o.is_empty());
    }

    #[test]
    fn the_usage_book_is_bounded_and_drains() {
        let mut u = UsageBook::default();
        assert!(u.record(&"a".into(), "h:1"));
        assert!(u.record(&"a".into(), "h:1"));
        assert!(u.record(&"b".into(), "h:1"));
        let got = u.take();
        assert_eq!(
            got.iter().map(|x| (x.adapter.as_str(), x.address.as_str(), x.requests)).collect::<Vec<_>>(),
            [("a", "h:1", 2), ("b", "h:1", 1)]
        );
        assert!(u.take().is_empty());
        for i in 0..MAX_USAGE_KEYS {
            assert!(u.record(&AdapterName::from(format!("a{i}")), "h:1"));
        }
        assert!(!u.record(&"new".into(), "h:1"), "full: a new pair is dropped");
        assert!(u.record(&"a0".into(), "h:1"), "known pairs still count");
        assert_eq!(u.take().len(), MAX_USAGE_KEYS);
    }

    #[test]
    fn in_flight_pairs_are_reported_until_they_end_and_changes_are_urgent() {
        let mut u = UsageBook::default();
        let a: AdapterName = "a".into();
        assert!(!u.urgent() && !u.busy());
        assert!(u.begin(&a, "h:1"), "the first in flight is a change");
        assert!(!u.begin(&a, "h:1"), "the second is not");
        assert!(u.urgent() && u.busy());
        u.record(&a, "h:1");
        let got = u.take();
        assert_eq!(got.iter().map(|x| (x.requests, x.in_flight)).collect::<Vec<_>>(), [(1, 2)]);
        assert!(!u.urgent(), "told");
        // Still in flight, no new request: reported again (the leader's keep-alive).
        assert_eq!(u.take().iter().map(|x| (x.requests, x.in_flight)).collect::<Vec<_>>(), [(0, 2)]);
        assert!(!u.end(&a, "h:1") && !u.urgent());
        assert!(u.end(&a, "h:1") && u.urgent(), "the last one ending is a change");
        assert!(!u.busy());
        assert!(u.take().is_empty(), "nothing counted or in flight: an empty report clears the pair");
        assert!(!u.end(&a, "h:1"), "an unknown pair is no change");
    }
}
