//! What the autoscaler knows about one model: per-replica engine series and the gateways'
//! aggregate series, filled by the actor about once a second, kept for the stable window.
//! A signal with no fresh sample is unknown, which the decisions treat as "cannot scale
//! down", never as zero load.
//!
//! ```text
//!  agent heartbeats ──EngineSample per replica──> engines[replica].{running,waiting,kv,tokens}
//!  gateway reports ──merged GatewaySample──────> gateway.{in_flight,queued,held,arrivals,...}
//!                                                  │ reading(metric, span, ready)
//!                                                  v
//!                                  Reading {total over known replicas, known, unknown}
//! ```
use std::collections::{BTreeMap, BTreeSet};

use flotilla_api::spec::{AutoscalingSpec, MetricKind};
use flotilla_api::ObjectName;

use super::window::Window;

/// One scrape of one replica's engine. `None`: that value is unknown (scrape failed, or
/// the metric is missing), not zero.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineSample {
    /// `vllm:num_requests_running`.
    pub running: Option<f64>,
    /// `vllm:num_requests_waiting`.
    pub waiting: Option<f64>,
    /// `vllm:kv_cache_usage_perc`, a fraction in [0, 1].
    pub kv_cache_usage: Option<f64>,
    /// The rate of `vllm:generation_tokens_total`, tokens per second.
    pub generation_tokens_per_s: Option<f64>,
}

/// All gateways' view of one model at one time, merged by the actor: gauges summed over
/// the gateways' latest reports, rates summed, percentiles the largest of the gateways'.
/// A model no recently-reporting gateway mentioned gets zeros (no traffic); when no gateway
/// reported recently, record nothing (unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GatewaySample {
    /// Requests being served now.
    pub in_flight: f64,
    /// Requests waiting in the gateways' QoS queues.
    pub queued: f64,
    /// Requests held because the model has no ready replica (scale from zero).
    pub held: f64,
    /// Requests received per second.
    pub arrivals_per_s: f64,
    /// Requests completed per second.
    pub completed_per_s: f64,
    /// p95 over the requests completed since the previous sample; `None` when none completed.
    pub ttft_p95_ms: Option<f64>,
    pub tpot_p95_ms: Option<f64>,
    pub queue_wait_p95_ms: Option<f64>,
}

#[derive(Debug, Clone, Default)]
struct EngineSeries {
    running: Window,
    waiting: Window,
    kv_cache_usage: Window,
    generation_tokens: Window,
    /// When the replica went away: its history still counts for the time it served.
    departed_ms: Option<u64>,
}

impl EngineSeries {
    fn window(&self, kind: MetricKind) -> Option<&Window> {
        match kind {
            MetricKind::RequestsRunning => Some(&self.running),
            MetricKind::RequestsWaiting => Some(&self.waiting),
            MetricKind::KvCacheUsage => Some(&self.kv_cache_usage),
            MetricKind::GenerationTokens => Some(&self.generation_tokens),
            _ => None,
        }
    }

    fn windows_mut(&mut self) -> [&mut Window; 4] {
        [&mut self.running, &mut self.waiting, &mut self.kv_cache_usage, &mut self.generation_tokens]
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct GatewaySeries {
    pub(crate) in_flight: Window,
    pub(crate) queued: Window,
    pub(crate) held: Window,
    pub(crate) arrivals: Window,
    pub(crate) completed: Window,
    pub(crate) ttft_p95: Window,
    pub(crate) tpot_p95: Window,
    pub(crate) queue_wait_p95: Window,
    last_ms: Option<u64>,
}

/// The value of one metric over a span: `total` sums the replicas whose value is known (a
/// lower bound of the true total when some are not); a latency metric's `total` is the
/// latency itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub total: f64,
    pub known: u32,
    pub unknown: u32,
}

impl Reading {
    fn unknown() -> Reading {
        Reading { total: 0.0, known: 0, unknown: 1 }
    }

    pub fn is_complete(&self) -> bool {
        self.unknown == 0
    }
}

/// How a reading looks back: a mean over a span, or the newest fresh sample (HPA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Over(u64),
    Latest,
}

/// The per-model signals. Series are pruned to `retention_ms` as samples arrive.
#[derive(Debug, Clone)]
pub struct Signals {
    engines: BTreeMap<ObjectName, EngineSeries>,
    pub(crate) gateway: GatewaySeries,
    retention_ms: u64,
    last_prune_ms: u64,
    /// A series whose newest sample is older than this is unknown; a sample stands for
    /// the replica's value until the next one, at most this long.
    pub stale_after_ms: u64,
}

impl Signals {
    /// Default staleness: a few missed one-second reports.
    pub const DEFAULT_STALE_AFTER_MS: u64 = 15_000;

    /// Signals kept long enough for `spec`'s windows.
    pub fn for_spec(spec: &AutoscalingSpec) -> Signals {
        Signals::new(retention_ms(spec))
    }

    pub fn new(retention_ms: u64) -> Signals {
        Signals {
            engines: BTreeMap::new(),
            gateway: GatewaySeries::default(),
            retention_ms,
            last_prune_ms: 0,
            stale_after_ms: Signals::DEFAULT_STALE_AFTER_MS,
        }
    }

    /// Keeps samples for `retention_ms` (after a spec change; see [`retention_ms`]).
    pub fn set_retention(&mut self, retention_ms: u64) {
        self.retention_ms = retention_ms;
    }

    /// Records one scrape of a serving replica. Record every ready replica each tick, at
    /// the same `now_ms`, with `None` for what its scrape lacked: a ready replica without
    /// fresh samples is unknown.
    pub fn record_engine(&mut self, replica: &ObjectName, now_ms: u64, s: EngineSample) {
        self.prune(now_ms);
        let e = self.engines.entry(replica.clone()).or_default();
        e.departed_ms = None;
        let values = [s.running, s.waiting, s.kv_cache_usage, s.generation_tokens_per_s];
        for (w, v) in e.windows_mut().into_iter().zip(values) {
            if let Some(v) = v {
                w.push(now_ms, v);
            }
        }
    }

    /// Records the gateways' merged view at `now_ms`.
    pub fn record_gateway(&mut self, now_ms: u64, s: GatewaySample) {
        self.prune(now_ms);
        let g = &mut self.gateway;
        g.last_ms = Some(g.last_ms.map_or(now_ms, |t| t.max(now_ms)));
        let fields = [
            (&mut g.in_flight, Some(s.in_flight)),
            (&mut g.queued, Some(s.queued)),
            (&mut g.held, Some(s.held)),
            (&mut g.arrivals, Some(s.arrivals_per_s)),
            (&mut g.completed, Some(s.completed_per_s)),
            (&mut g.ttft_p95, s.ttft_p95_ms),
            (&mut g.tpot_p95, s.tpot_p95_ms),
            (&mut g.queue_wait_p95, s.queue_wait_p95_ms),
        ];
        for (w, v) in fields {
            if let Some(v) = v {
                w.push(now_ms, v);
            }
        }
    }

    /// Drops samples older than the retention, at most once a second.
    fn prune(&mut self, now_ms: u64) {
        if now_ms < self.last_prune_ms.saturating_add(1000) {
            return;
        }
        self.last_prune_ms = now_ms;
        let before = now_ms.saturating_sub(self.retention_ms);
        for e in self.engines.values_mut() {
            e.windows_mut().into_iter().for_each(|w| w.prune(before));
        }
        self.engines.retain(|_, e| e.departed_ms.is_none_or(|t| t >= before));
        let g = &mut self.gateway;
        for w in [
            &mut g.in_flight,
            &mut g.queued,
            &mut g.held,
            &mut g.arrivals,
            &mut g.completed,
            &mut g.ttft_p95,
            &mut g.tpot_p95,
            &mut g.queue_wait_p95,
        ] {
            w.prune(before);
        }
    }

    /// A replica went away (stopped, failed, drained) at `now_ms`: it no longer counts as
    /// unknown, and the load it carried before still counts in the windows.
    pub fn remove_replica(&mut self, replica: &ObjectName, now_ms: u64) {
        if let Some(e) = self.engines.get_mut(replica) {
            e.departed_ms.get_or_insert(now_ms);
        }
    }

    /// Removes (as [`Signals::remove_replica`]) the replicas `keep` refuses.
    pub fn retain_replicas(&mut self, now_ms: u64, mut keep: impl FnMut(&ObjectName) -> bool) {
        for (name, e) in self.engines.iter_mut() {
            if !keep(name) {
                e.departed_ms.get_or_insert(now_ms);
            }
        }
    }

    /// Replicas recorded and not removed.
    pub fn replicas(&self) -> impl Iterator<Item = &ObjectName> {
        self.engines.iter().filter(|(_, e)| e.departed_ms.is_none()).map(|(n, _)| n)
    }

    /// Whether the gateways reported within `stale_after_ms`.
    pub fn gateway_fresh(&self, now_ms: u64) -> bool {
        self.gateway.last_ms.is_some_and(|t| t <= now_ms && now_ms - t <= self.stale_after_ms)
    }

    /// A gateway gauge or rate over `span`; `None` when the gateways are not fresh.
    pub(crate) fn gateway_value(&self, w: &Window, now_ms: u64, span: Span) -> Option<f64> {
        if !self.gateway_fresh(now_ms) {
            return None;
        }
        match span {
            Span::Over(ms) => w.average(now_ms, ms),
            Span::Latest => w.latest(now_ms).map(|s| s.1),
        }
    }

    /// Requests held at the gateways for want of a ready replica, from the newest fresh report.
    pub fn held(&self, now_ms: u64) -> f64 {
        self.gateway_value(&self.gateway.held, now_ms, Span::Latest).unwrap_or(0.0)
    }

    /// The value of `kind` over `span`. An engine metric is the mean over the span's ticks
    /// of the sum over replicas (each sample standing until the replica's next one, at
    /// most `stale_after_ms`), so load moving between replicas is not counted twice.
    /// Current replicas without a fresh sample, and ready replicas never recorded, count
    /// as unknown.
    pub fn reading(&self, kind: MetricKind, now_ms: u64, span: Span, ready: u32) -> Reading {
        let g = &self.gateway;
        let gw = |w: &Window| self.gateway_value(w, now_ms, span);
        let one = |v: Option<f64>| v.map_or(Reading::unknown(), |total| Reading { total, known: 1, unknown: 0 });
        match kind {
            MetricKind::Concurrency => {
                one(gw(&g.in_flight).zip(gw(&g.queued)).zip(gw(&g.held)).map(|((a, b), c)| a + b + c))
            }
            MetricKind::QueueDepth => one(gw(&g.queued).zip(gw(&g.held)).map(|(a, b)| a + b)),
            MetricKind::RequestsPerSecond => one(gw(&g.arrivals)),
            MetricKind::QueueWaitP95 => match gw(&g.queue_wait_p95) {
                Some(v) => one(Some(v)),
                // No completed request carried a wait: zero if nothing arrived or waited.
                None => one(self.gateway_idle(now_ms, span).then_some(0.0)),
            },
            _ => self.engine_reading(kind, now_ms, span, ready),
        }
    }

    fn engine_reading(&self, kind: MetricKind, now_ms: u64, span: Span, ready: u32) -> Reading {
        let series: Vec<(&EngineSeries, &Window)> =
            self.engines.values().filter_map(|e| e.window(kind).map(|w| (e, w))).collect();
        let fresh = |w: &Window| w.latest(now_ms).is_some_and(|(t, _)| now_ms - t <= self.stale_after_ms);
        let current = series.iter().filter(|(e, _)| e.departed_ms.is_none());
        let known = current.clone().filter(|(_, w)| fresh(w)).count() as u32;
        let recorded_unknown = current.count() as u32 - known;
        let unknown = recorded_unknown + ready.saturating_sub(known + recorded_unknown);
        // The value of one replica at `t`: its newest sample at or before `t`, if recent.
        let at = |e: &EngineSeries, w: &Window, t: u64| -> Option<f64> {
            if e.departed_ms.is_some_and(|d| d < t) {
                return None;
            }
            w.latest(t).filter(|(ts, _)| t - ts <= self.stale_after_ms).map(|s| s.1)
        };
        let total = match span {
            Span::Latest => series.iter().filter_map(|(e, w)| at(e, w, now_ms)).sum(),
            Span::Over(ms) => {
                let ticks: BTreeSet<u64> = series.iter().flat_map(|(_, w)| w.times(now_ms, ms)).collect();
                let sum: f64 = ticks.iter().map(|t| series.iter().filter_map(|(e, w)| at(e, w, *t)).sum::<f64>()).sum();
                if ticks.is_empty() {
                    0.0
                } else {
                    sum / ticks.len() as f64
                }
            }
        };
        Reading { total, known, unknown }
    }

    /// No request in flight, queued, held or arriving at the gateways over `span`, and the
    /// gateways fresh.
    pub(crate) fn gateway_idle(&self, now_ms: u64, span: Span) -> bool {
        let g = &self.gateway;
        [&g.in_flight, &g.queued, &g.held, &g.arrivals]
            .iter()
            .all(|w| self.gateway_value(w, now_ms, span).is_some_and(|v| v == 0.0))
    }

    /// Zero demand over the last `span_ms`: the gateways are fresh and idle, and no
    /// current replica runs or queues a request. Unknown gateways are not idle.
    pub fn is_idle(&self, now_ms: u64, span_ms: u64) -> bool {
        let span = Span::Over(span_ms);
        self.gateway_idle(now_ms, span)
            && [MetricKind::RequestsRunning, MetricKind::RequestsWaiting]
                .iter()
                .all(|k| self.engine_reading(*k, now_ms, span, 0).total == 0.0)
    }
}

/// How long signals must be kept for `spec`: its longest window.
pub fn retention_ms(spec: &AutoscalingSpec) -> u64 {
    spec.stable_window.as_millis().max(spec.panic_window.as_millis())
}
