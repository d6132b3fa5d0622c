//! Demand reports for the leader's autoscaler (`AutoscaleService.ReportDemand`, cluster
//! endpoints only): per base model (an adapter's requests count toward its base), what this
//! gateway saw since its previous report. Best effort: a report that fails is dropped and
//! counted; requests only ever touch the in-memory [`DemandBook`].
//!
//! ```text
//! request ─ arrival(base) ─ [held: hold.rs] ─ Queued guard ─ lease ─ InFlight guard ─ settle
//!    │                                          (acquire)            (Tracker)        │
//!    └─ answered 429/503: rejected(base)                       finished(base, TTFT, TPOT, wait)
//! report_loop: every --demand-report-interval-ms, or at once when a model's first request
//!   is held ─> take() ─> ReportDemand{gateway_id, interval_ms, models} ─> LeaderLink
//! ```
//!
//! State is bounded: an entry exists only for a model seen since the previous report or
//! with requests in flight or queued now ([`MAX_MODELS`] at most), and percentiles are
//! taken over a uniform sample of at most [`MAX_SAMPLES`] values per interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use flotilla_api::pb;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::ResultLabels;
use crate::names::ModelName;
use crate::state::Gateway;

/// Most models tracked between two reports; further models are not counted.
pub const MAX_MODELS: usize = 1024;
/// Most latency values kept per model, figure and interval (a uniform reservoir sample).
pub const MAX_SAMPLES: usize = 1024;
/// Most templates counted apart per model and interval (a rollout has two; more only
/// while one replaces another mid-rollout).
pub const MAX_REVISIONS: usize = 8;

/// A uuid (version 4) for this gateway process.
pub fn new_gateway_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16))
}

/// The nearest-rank percentile `p` (0..=1) of `v`, 0 when empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = (p * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// A bounded uniform sample of one interval's values (milliseconds).
#[derive(Debug, Default)]
struct Samples {
    kept: Vec<f64>,
    seen: u32,
}

impl Samples {
    fn add(&mut self, v: f64) {
        self.seen = self.seen.saturating_add(1);
        if self.kept.len() < MAX_SAMPLES {
            self.kept.push(v);
            return;
        }
        let j = rand::random_range(0..self.seen as usize);
        if j < MAX_SAMPLES {
            self.kept[j] = v;
        }
    }
}

/// Which gauge a [`GaugeGuard`] holds up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaugeKind {
    /// Waiting for a lease in the QoS queue.
    Queued,
    /// Holding a lease: being served.
    InFlight,
}

/// What one finished request contributes to its interval's percentiles.
#[derive(Debug, Clone, Copy, Default)]
pub struct Finished {
    /// Time to first token (streams), the cold-start hold excluded.
    pub ttft: Option<Duration>,
    pub tpot: Option<Duration>,
    pub queue_wait: Duration,
    /// The template hash of the replica that served it (0: unknown).
    pub revision: u64,
    /// Answered 5xx, or cut off before its end.
    pub error: bool,
}

/// One template's share of a model's interval.
#[derive(Debug, Default)]
struct RevisionEntry {
    completed: u32,
    errors: u32,
    ttft: Samples,
}

#[derive(Debug, Default)]
struct Entry {
    in_flight: u32,
    queued: u32,
    arrivals: u32,
    completed: u32,
    rejected: u32,
    ttft: Samples,
    tpot: Samples,
    queue_wait: Samples,
    revisions: HashMap<u64, RevisionEntry>,
}

impl Entry {
    fn gauge(&mut self, kind: GaugeKind) -> &mut u32 {
        match kind {
            GaugeKind::Queued => &mut self.queued,
            GaugeKind::InFlight => &mut self.in_flight,
        }
    }
}

#[derive(Debug)]
struct Book {
    models: HashMap<ModelName, Entry>,
    since: Instant,
}

/// Per-model demand since the previous report (see the module docs).
#[derive(Debug)]
pub struct DemandBook {
    enabled: bool,
    gateway_id: String,
    book: Mutex<Book>,
    kick: Notify,
}

/// Holds one gauge of a model up until dropped.
#[derive(Debug)]
pub struct GaugeGuard {
    book: Arc<DemandBook>,
    model: ModelName,
    kind: GaugeKind,
    counted: bool,
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        // an entry with a gauge above zero is never removed (see `take`)
        if let Some(e) = self.book.lock().models.get_mut(&self.model) {
            let g = e.gauge(self.kind);
            *g = g.saturating_sub(1);
        }
    }
}

impl DemandBook {
    /// A book that counts only when `enabled` (reports are sent).
    pub fn new(enabled: bool) -> Self {
        DemandBook {
            enabled,
            gateway_id: new_gateway_id(),
            book: Mutex::new(Book { models: HashMap::new(), since: Instant::now() }),
            kick: Notify::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `f` to `model`'s entry; false when off or when the book is full.
    fn with(&self, model: &ModelName, f: impl FnOnce(&mut Entry)) -> bool {
        if !self.enabled {
            return false;
        }
        let mut b = self.lock();
        if let Some(e) = b.models.get_mut(model) {
            f(e);
            return true;
        }
        if b.models.len() >= MAX_MODELS {
            return false;
        }
        f(b.models.entry(model.clone()).or_default());
        true
    }

    /// A request for `model` arrived.
    pub fn arrival(&self, model: &ModelName) {
        self.with(model, |e| e.arrivals = e.arrivals.saturating_add(1));
    }

    /// A request for `model` was answered 429 or 503 by the gateway.
    pub fn rejected(&self, model: &ModelName) {
        self.with(model, |e| e.rejected = e.rejected.saturating_add(1));
    }

    /// A request for `model` finished (any answer but a rejection).
    pub fn finished(&self, model: &ModelName, f: Finished) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        self.with(model, |e| {
            e.completed = e.completed.saturating_add(1);
            if let Some(t) = f.ttft {
                e.ttft.add(ms(t));
            }
            if let Some(t) = f.tpot {
                e.tpot.add(ms(t));
            }
            e.queue_wait.add(ms(f.queue_wait));
            if f.revision != 0 && (e.revisions.len() < MAX_REVISIONS || e.revisions.contains_key(&f.revision)) {
                let r = e.revisions.entry(f.revision).or_default();
                r.completed = r.completed.saturating_add(1);
                r.errors = r.errors.saturating_add(u32::from(f.error));
                if let Some(t) = f.ttft {
                    r.ttft.add(ms(t));
                }
            }
        });
    }

    /// Raises `model`'s `kind` gauge until the guard is dropped.
    pub fn gauge(self: &Arc<Self>, model: &ModelName, kind: GaugeKind) -> GaugeGuard {
        let counted = self.with(model, |e| {
            let g = e.gauge(kind);
            *g = g.saturating_add(1);
        });
        GaugeGuard { book: self.clone(), model: model.clone(), kind, counted }
    }

    /// Asks the report loop to report now (the first request held for a model).
    pub fn kick(&self) {
        if self.enabled {
            self.kick.notify_one();
        }
    }

    /// The report of everything since the previous one, `held` (per model, now) included;
    /// counters and samples restart, and models with nothing in flight or queued are
    /// forgotten once reported.
    pub fn take(&self, held: &HashMap<ModelName, u32>, now: Instant) -> pb::ReportDemandRequest {
        let (interval, taken) = {
            let mut b = self.lock();
            let interval = now.saturating_duration_since(b.since);
            b.since = now;
            let taken: Vec<(ModelName, u32, u32, Entry)> =
                b.models.iter_mut().map(|(name, e)| (name.clone(), e.in_flight, e.queued, std::mem::take(e))).collect();
            for (name, in_flight, queued, _) in &taken {
                if let Some(e) = b.models.get_mut(name) {
                    (e.in_flight, e.queued) = (*in_flight, *queued);
                }
            }
            b.models.retain(|_, e| e.in_flight > 0 || e.queued > 0);
            (interval, taken)
        };
        let mut models: Vec<pb::ModelDemand> = taken
            .into_iter()
            .map(|(model, in_flight, queued, mut e)| pb::ModelDemand {
                held: held.get(&model).copied().unwrap_or(0),
                model: model.to_string(),
                in_flight,
                queued,
                arrivals: e.arrivals,
                completed: e.completed,
                rejected: e.rejected,
                ttft_p95_ms: percentile(&mut e.ttft.kept, 0.95),
                tpot_p95_ms: percentile(&mut e.tpot.kept, 0.95),
                queue_wait_p95_ms: percentile(&mut e.queue_wait.kept, 0.95),
                ttft_samples: e.ttft.seen,
                revisions: e
                    .revisions
                    .iter_mut()
                    .map(|(hash, r)| pb::RevisionDemand {
                        hash: format!("{hash:010x}"),
                        completed: r.completed,
                        errors: r.errors,
                        ttft_p95_ms: percentile(&mut r.ttft.kept, 0.95),
                        ttft_samples: r.ttft.seen,
                    })
                    .collect(),
            })
            .collect();
        for (model, &n) in held {
            if n > 0 && !models.iter().any(|m| model == m.model.as_str()) {
                models.push(pb::ModelDemand { model: model.to_string(), held: n, ..Default::default() });
            }
        }
        models.sort_by(|a, b| a.model.cmp(&b.model));
        pb::ReportDemandRequest {
            gateway_id: self.gateway_id.clone(),
            interval_ms: interval.as_millis().min(u64::MAX as u128) as u64,
            models,
        }
    }
}

/// Sends one report of everything since the previous one; a failure is logged, counted
/// and dropped.
pub async fn send_report(gw: &Gateway, every: Duration) {
    let req = gw.demand.take(&gw.held_by_service(gw.holds.counts()), Instant::now());
    let n = req.models.len();
    let deadline = Instant::now() + every.clamp(Duration::from_millis(500), Duration::from_secs(5));
    let r = gw
        .loader
        .link
        .call_on(deadline, |ch| {
            let req = req.clone();
            async move { pb::autoscale_service_client::AutoscaleServiceClient::new(ch).report_demand(req).await }
        })
        .await;
    let result = match &r {
        Ok(_) => "ok",
        Err(e) => {
            tracing::debug!(models = n, reason = e.reason(), error = %e.message(), "demand report dropped");
            "error"
        }
    };
    gw.metrics.demand_reports.get_or_create(&ResultLabels { result: result.into() }).inc();
}

/// Reports every `every`, and at once when kicked ([`DemandBook::kick`]).
pub async fn report_loop(gw: Weak<Gateway>, every: Duration) {
    let Some(book) = gw.upgrade().map(|g| g.demand.clone()) else { return };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let kicked = tokio::select! {
            _ = tick.tick() => false,
            _ = book.kick.notified() => true,
        };
        if kicked {
            tick.reset();
        }
        let Some(gw) = gw.upgrade() else { return };
        send_report(&gw, every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&mut [], 0.95), 0.0);
        assert_eq!(percentile(&mut [7.0], 0.95), 7.0);
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.95), 95.0);
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        let mut v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.95), 10.0);
    }

    #[test]
    fn gateway_ids_are_v4_uuids() {
        let a = new_gateway_id();
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert!(a.split('-').map(str::len).eq([8, 4, 4, 4, 12]));
        assert_ne!(a, new_gateway_id());
    }

    #[test]
    fn a_report_counts_the_interval_and_keeps_only_live_gauges() {
        let book = Arc::new(DemandBook::new(true));
        let t0 = Instant::now();
        {
            let b = book.lock();
            assert!(b.models.is_empty());
        }
        for _ in 0..3 {
            book.arrival(&"m".into());
        }
        book.rejected(&"m".into());
        let queued = book.gauge(&"m".into(), GaugeKind::Queued);
        let in_flight = book.gauge(&"m".into(), GaugeKind::InFlight);
        let done = |ttft| Finished { ttft, tpot: Some(ms(20)), queue_wait: ms(5), ..Finished::default() };
        book.finished(&"m".into(), done(Some(ms(100))));
        book.finished(&"m".into(), done(None));
        book.arrival(&"other".into());
        let held: HashMap<ModelName, u32> = [("cold".into(), 4)].into_iter().collect();
        let r = book.take(&held, t0 + ms(1000));
        assert_eq!(r.gateway_id, book.gateway_id());
        assert!(r.interval_ms >= 1000, "{}", r.interval_ms);
        let names: Vec<&str> = r.models.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(names, ["cold", "m", "other"]);
        assert_eq!((r.models[0].held, r.models[0].arrivals), (4, 0));
        let m = &r.models[1];
        assert_eq!((m.arrivals, m.completed, m.rejected, m.in_flight, m.queued), (3, 2, 1, 1, 1));
        assert_eq!((m.ttft_p95_ms, m.ttft_samples, m.tpot_p95_ms, m.queue_wait_p95_ms), (100.0, 1, 20.0, 5.0));
        // next interval: counters restart, gauges stay, "other" is forgotten
        drop(queued);
        let r = book.take(&HashMap::new(), t0 + ms(2000));
        assert_eq!(r.models.len(), 1);
        let m = &r.models[0];
        assert_eq!((m.arrivals, m.completed, m.in_flight, m.queued, m.ttft_samples), (0, 0, 1, 0, 0));
        assert_eq!(m.ttft_p95_ms, 0.0);
        drop(in_flight);
        let r = book.take(&HashMap::new(), t0 + ms(3000));
        assert_eq!((r.models.len(), r.models[0].in_flight), (1, 0), "reported once at zero");
        assert!(book.take(&HashMap::new(), t0 + ms(4000)).models.is_empty(), "then forgotten");
    }

    #[test]
    fn finished_requests_are_split_by_the_template_that_served_them() {
        let book = Arc::new(DemandBook::new(true));
        let m: ModelName = "m".into();
        let done = |revision: u64, error: bool, ttft_ms: u64| Finished {
            revision,
            error,
            ttft: Some(Duration::from_millis(ttft_ms)),
            ..Finished::default()
        };
        for _ in 0..3 {
            book.finished(&m, done(0xab, false, 10));
        }
        book.finished(&m, done(0xcd, true, 90));
        book.finished(&m, done(0, false, 5)); // a static backend: no template
        let report = book.take(&HashMap::new(), Instant::now());
        let mut revs = report.models[0].revisions.clone();
        revs.sort_by(|a, b| a.hash.cmp(&b.hash));
        let got: Vec<_> = revs.iter().map(|r| (r.hash.as_str(), r.completed, r.errors, r.ttft_p95_ms)).collect();
        assert_eq!(got, [("00000000ab", 3, 0, 10.0), ("00000000cd", 1, 1, 90.0)]);
        assert_eq!(report.models[0].completed, 5);
    }

    #[test]
    fn the_book_is_bounded_and_off_when_disabled() {
        let book = Arc::new(DemandBook::new(true));
        for i in 0..MAX_MODELS + 10 {
            book.arrival(&ModelName::from(format!("m{i}")));
        }
        assert_eq!(book.lock().models.len(), MAX_MODELS);
        let g = book.gauge(&"late".into(), GaugeKind::InFlight);
        drop(g); // not counted, nothing to undo
        for _ in 0..3 * MAX_SAMPLES {
            book.finished(&"m0".into(), Finished { ttft: Some(ms(1)), ..Default::default() });
        }
        let r = book.take(&HashMap::new(), Instant::now());
        let m0 = r.models.iter().find(|m| m.model == "m0").unwrap();
        assert_eq!((m0.completed, m0.ttft_samples), (3 * MAX_SAMPLES as u32, 3 * MAX_SAMPLES as u32));
        assert_eq!(r.models.len(), MAX_MODELS);
        let off = Arc::new(DemandBook::new(false));
        off.arrival(&"m".into());
        let _g = off.gauge(&"m".into(), GaugeKind::Queued);
        assert!(off.take(&HashMap::new(), Instant::now()).models.is_empty());
    }
}
