//! Scale from zero (cluster endpoints only): a request for a model that exists (a watched
//! `Model` object) but has no ready endpoint — scaled to zero, or not up yet — is held here,
//! per model and bounded, until an endpoint appears, the model is deleted, or its deadline.
//!
//! ```text
//! request ─ no endpoint, Model exists ─> Holds::push (at most --max-held-per-model,
//!    │                                     else 503 cold_start_full)
//!    │  first held for the model: a demand report at once (held > 0: the leader scales up)
//!    v
//! Directory::changes ─> release_loop ─ endpoint appeared (or Model deleted) ─> wake all,
//!    │                                   critical first, then standard, then sheddable,
//!    │                                   each class in arrival order
//!    │                  ─> the request resolves again ─> admission (QoS queue) as usual
//!    └─ deadline (the longer of --cold-start-timeout-ms and the class's queue deadline,
//!       from arrival) ─> 503 cold_start_timeout, Retry-After
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use flotilla_api::spec::PriorityClass;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::error::{ApiCode, ApiError};
use crate::metrics::ModelLabels;
use crate::names::ModelName;
use crate::state::Gateway;

/// Seconds a client is told to wait after a hold timed out (a cold start takes minutes).
pub const RETRY_AFTER_TIMEOUT_S: u64 = 10;
/// Seconds a client is told to wait when the model's hold queue is full.
pub const RETRY_AFTER_FULL_S: u64 = 5;

/// Release order: class (critical first), then arrival.
type Key = (u8, u64);

fn class_rank(c: PriorityClass) -> u8 {
    match c {
        PriorityClass::Critical => 0,
        PriorityClass::Standard => 1,
        PriorityClass::Sheddable => 2,
    }
}

/// The held requests of every model.
#[derive(Debug)]
pub struct Holds {
    queues: Mutex<HashMap<ModelName, BTreeMap<Key, oneshot::Sender<()>>>>,
    seq: AtomicU64,
    gauge: Family<ModelLabels, Gauge>,
}

/// A place in a model's hold queue.
#[derive(Debug)]
pub struct Ticket {
    pub key: Key,
    pub rx: oneshot::Receiver<()>,
    /// The model had nothing held before.
    pub first: bool,
}

impl Holds {
    /// `gauge`: `held_requests{model}`, kept equal to each queue's length.
    pub fn new(gauge: Family<ModelLabels, Gauge>) -> Self {
        Holds { queues: Mutex::new(HashMap::new()), seq: AtomicU64::new(0), gauge }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ModelName, BTreeMap<Key, oneshot::Sender<()>>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_gauge(&self, model: &ModelName, n: usize) {
        self.gauge.get_or_create(&ModelLabels { model: model.to_string() }).set(n as i64);
    }

    /// Holds a request of `class` for `model`; Err(held now) when `max` are held already.
    pub fn push(&self, model: &ModelName, class: PriorityClass, max: usize) -> Result<Ticket, usize> {
        let mut m = self.lock();
        let n = m.get(model).map_or(0, BTreeMap::len);
        if n >= max {
            return Err(n);
        }
        let key = (class_rank(class), self.seq.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        m.entry(model.clone()).or_default().insert(key, tx);
        self.set_gauge(model, n + 1);
        Ok(Ticket { key, rx, first: n == 0 })
    }

    /// Gives up a place (deadline, client gone); false when it was released already.
    pub fn remove(&self, model: &ModelName, key: Key) -> bool {
        let mut m = self.lock();
        let Some(q) = m.get_mut(model) else { return false };
        let found = q.remove(&key).is_some();
        let n = q.len();
        if n == 0 {
            m.remove(model);
        }
        if found {
            self.set_gauge(model, n);
        }
        found
    }

    /// Wakes every request held for `model`, in release order; returns how many.
    pub fn release(&self, model: &ModelName) -> usize {
        let Some(q) = self.lock().remove(model) else { return 0 };
        self.set_gauge(model, 0);
        let n = q.len();
        for (_, tx) in q {
            let _ = tx.send(());
        }
        n
    }

    /// Requests held now, per model.
    pub fn counts(&self) -> HashMap<ModelName, u32> {
        self.lock().iter().map(|(k, q)| (k.clone(), q.len().min(u32::MAX as usize) as u32)).collect()
    }

    /// Models with requests held.
    pub fn models(&self) -> Vec<ModelName> {
        self.lock().keys().cloned().collect()
    }
}

/// Removes its place from the hold queue when dropped (the client left mid-hold).
struct Place<'a> {
    holds: &'a Holds,
    model: &'a ModelName,
    key: Option<Key>,
}

impl Place<'_> {
    /// Gives the place up now; false when it was released already.
    fn cancel(&mut self) -> bool {
        self.key.take().is_some_and(|k| self.holds.remove(self.model, k))
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Gateway {
    /// A request for `name` is to be held: endpoints come from the cluster and are
    /// known, the `Model` exists, and it has no endpoint.
    pub fn needs_hold(&self, name: &str) -> bool {
        self.loader.enabled()
            && self.dir.synced()
            && self.dir.model(name).is_some()
            && self.dir.endpoints().by_model.get(name).is_none_or(Vec::is_empty)
    }

    /// `model` has an endpoint, or its `Model` is gone: its held requests go on.
    fn release_due(&self, model: &str) -> bool {
        self.dir.endpoints().by_model.get(model).is_some_and(|v| !v.is_empty()) || self.dir.model(model).is_none()
    }

    /// Holds the request until `model` has an endpoint (Ok: resolve it again) or
    /// `deadline` (503 `cold_start_timeout`); 503 `cold_start_full` when too many are held.
    pub async fn hold_until_ready(
        self: &Arc<Self>,
        model: &ModelName,
        class: PriorityClass,
        deadline: Instant,
    ) -> Result<(), ApiError> {
        let start = Instant::now();
        let ticket = self.holds.push(model, class, self.cfg.max_held_per_model).map_err(|n| {
            ApiError::new(
                ApiCode::ColdStartFull,
                format!("model {model:?} has no ready endpoint yet and {n} requests are already waiting for one"),
            )
            .retry_after(RETRY_AFTER_FULL_S)
        })?;
        let mut place = Place { holds: &self.holds, model, key: Some(ticket.key) };
        if ticket.first {
            tracing::info!(model = %model, "model has no ready endpoint; holding its requests until one appears");
            self.demand.kick();
        }
        // an endpoint may have appeared between the caller's look and the push
        if self.release_due(model.as_str()) {
            self.holds.release(model);
        }
        match tokio::time::timeout_at(deadline, ticket.rx).await {
            Ok(_) => {
                drop(place);
                self.metrics.cold_start_seconds.observe(start.elapsed().as_secs_f64());
                Ok(())
            }
            Err(_) => {
                if !place.cancel() {
                    // released at the deadline: go on
                    self.metrics.cold_start_seconds.observe(start.elapsed().as_secs_f64());
                    return Ok(());
                }
                self.metrics.held_timeouts.get_or_create(&ModelLabels { model: model.to_string() }).inc();
                tracing::warn!(model = %model, waited_ms = start.elapsed().as_millis() as u64, "held request timed out");
                Err(ApiError::new(
                    ApiCode::ColdStartTimeout,
                    format!(
                        "model {model:?} has no ready endpoint: none came up within the {} ms hold deadline \
                         (it may be scaling up from zero; retry later)",
                        self.cfg.hold_deadline(class).as_millis()
                    ),
                )
                .retry_after(RETRY_AFTER_TIMEOUT_S))
            }
        }
    }
}

/// Releases held requests whenever the table or the models change.
pub async fn release_loop(gw: Weak<Gateway>, mut changes: watch::Receiver<u64>) {
    while changes.changed().await.is_ok() {
        let Some(gw) = gw.upgrade() else { return };
        for m in gw.holds.models() {
            if gw.release_due(m.as_str()) {
                let n = gw.holds.release(&m);
                tracing::info!(model = %m, released = n, "releasing held requests");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PriorityClass::*;

    #[test]
    fn held_requests_go_critical_first_then_in_arrival_order() {
        let h = Holds::new(Family::default());
        let mut tickets = Vec::new();
        for (i, c) in [Standard, Sheddable, Critical, Standard, Critical].into_iter().enumerate() {
            let t = h.push(&"m".into(), c, 10).unwrap();
            assert_eq!(t.first, i == 0);
            tickets.push((i, t));
        }
        assert_eq!(h.counts()["m"], 5);
        assert_eq!(h.gauge.get_or_create(&ModelLabels { model: "m".into() }).get(), 5);
        // the release order is the key order
        let mut keys: Vec<(Key, usize)> = tickets.iter().map(|(i, t)| (t.key, *i)).collect();
        keys.sort();
        assert_eq!(keys.iter().map(|(_, i)| *i).collect::<Vec<_>>(), [2, 4, 0, 3, 1]);
        assert_eq!(h.release(&"m".into()), 5);
        for (_, t) in &mut tickets {
            assert!(t.rx.try_recv().is_ok());
        }
        assert!(h.counts().is_empty() && h.models().is_empty());
        assert_eq!(h.gauge.get_or_create(&ModelLabels { model: "m".into() }).get(), 0);
        assert_eq!(h.release(&"m".into()), 0);
    }

    #[test]
    fn holds_are_bounded_per_model_and_can_be_given_up() {
        let h = Holds::new(Family::default());
        let a = h.push(&"m".into(), Standard, 2).unwrap();
        let _b = h.push(&"m".into(), Standard, 2).unwrap();
        assert_eq!(h.push(&"m".into(), Critical, 2).unwrap_err(), 2);
        assert!(h.push(&"other".into(), Standard, 2).is_ok(), "per model");
        assert!(h.remove(&"m".into(), a.key));
        assert!(!h.remove(&"m".into(), a.key), "once");
        assert!(h.push(&"m".into(), Standard, 2).is_ok(), "room again");
        assert_eq!(h.push(&"zero".into(), Standard, 0).unwrap_err(), 0, "0: never hold");
    }
}
