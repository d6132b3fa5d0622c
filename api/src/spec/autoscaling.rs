//! `spec.autoscaling` of a Model: replica bounds, the strategy, the signals it scales on
//! (engine or gateway metrics with per-replica targets, or a latency SLO), the windows,
//! tolerances, rates and delay that shape its decisions, and schedules that change the
//! bounds by local time. `validate` names the field at fault; the decisions themselves are
//! `flotilla_actors::autoscale::decide`. See `docs/autoscaling.md`.
//!
//! ```text
//!  autoscaling: {min, max, strategy, metric | metrics[] | slo, windows.., schedules[]}
//!        │ validate (names the field)            │ bounds_at(unix ms)
//!        v                                       v
//!   stored canonical JSON (defaults omitted)   Bounds {min, max, schedule}
//! ```
use serde::{Deserialize, Serialize};

use super::at_most;
use super::model::MAX_REPLICAS;
use crate::ApiError;

mod duration;
mod schedule;
#[cfg(test)]
mod tests;

pub use duration::SpecDuration;
pub use schedule::{Bounds, Schedule, TimeOfDay, Weekday};

/// Most metrics one model may scale on.
pub const MAX_METRICS: usize = 16;
/// Most schedules one model may have.
pub const MAX_SCHEDULES: usize = 32;
/// Longest stable or panic window (samples are kept in memory for that long).
pub const MAX_WINDOW: SpecDuration = SpecDuration::from_secs(3600);
/// Longest scale-down delay.
pub const MAX_SCALE_DOWN_DELAY: SpecDuration = SpecDuration::from_secs(86_400);

/// Autoscaler algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScalingStrategy {
    /// Knative-style: desired = ceil(total / target) over the stable window; a panic window
    /// scales up at once on bursts and never down while panicking.
    #[default]
    Kpa,
    /// AIBrix APA: no change inside a tolerance band around the target; each decision moves
    /// at most by `max_scale_up_rate` / `max_scale_down_rate`.
    Apa,
    /// Latency objective: scale up as the observed p95 nears `slo`, down when the measured
    /// capacity per replica says fewer replicas keep it.
    Slo,
    /// Plain HPA-style baseline: desired = ceil(current × value / target) on the latest
    /// samples each evaluation; no windows, tolerance, rates or delay.
    Hpa,
}

impl ScalingStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            ScalingStrategy::Kpa => "kpa",
            ScalingStrategy::Apa => "apa",
            ScalingStrategy::Slo => "slo",
            ScalingStrategy::Hpa => "hpa",
        }
    }
}

/// Where a metric comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricSource {
    /// Scraped from each replica's engine `/metrics`.
    #[default]
    Engine,
    /// Aggregated by the gateways over all their requests to the model.
    Gateway,
}

impl MetricSource {
    fn is_engine(&self) -> bool {
        *self == MetricSource::Engine
    }
}

/// The metrics the autoscaler understands, by source and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetricKind {
    /// Engine `vllm:num_requests_waiting`: requests queued in the engine.
    RequestsWaiting,
    /// Engine `vllm:num_requests_running`: requests in the running batch.
    RequestsRunning,
    /// Engine `vllm:kv_cache_usage_perc`: KV-cache usage, a fraction in [0, 1].
    KvCacheUsage,
    /// Engine `vllm:generation_tokens_total`, as its rate: generated tokens per second.
    GenerationTokens,
    /// Gateway `concurrency`: requests in flight plus queued plus held.
    Concurrency,
    /// Gateway `queue_depth`: requests queued plus held.
    QueueDepth,
    /// Gateway `queue_wait_p95_ms`: p95 of the time requests waited in the gateway queue.
    QueueWaitP95,
    /// Gateway `requests_per_second`: arrivals per second.
    RequestsPerSecond,
}

impl MetricKind {
    pub const ALL: [MetricKind; 8] = [
        MetricKind::RequestsWaiting,
        MetricKind::RequestsRunning,
        MetricKind::KvCacheUsage,
        MetricKind::GenerationTokens,
        MetricKind::Concurrency,
        MetricKind::QueueDepth,
        MetricKind::QueueWaitP95,
        MetricKind::RequestsPerSecond,
    ];

    pub fn source(self) -> MetricSource {
        match self {
            MetricKind::RequestsWaiting
            | MetricKind::RequestsRunning
            | MetricKind::KvCacheUsage
            | MetricKind::GenerationTokens => MetricSource::Engine,
            _ => MetricSource::Gateway,
        }
    }

    /// The name used in specs.
    pub fn name(self) -> &'static str {
        match self {
            MetricKind::RequestsWaiting => "vllm:num_requests_waiting",
            MetricKind::RequestsRunning => "vllm:num_requests_running",
            MetricKind::KvCacheUsage => "vllm:kv_cache_usage_perc",
            MetricKind::GenerationTokens => "vllm:generation_tokens_total",
            MetricKind::Concurrency => "concurrency",
            MetricKind::QueueDepth => "queue_depth",
            MetricKind::QueueWaitP95 => "queue_wait_p95_ms",
            MetricKind::RequestsPerSecond => "requests_per_second",
        }
    }

    /// A latency, the same whatever the replica count (as opposed to a load that adds up
    /// over replicas): its desired count is `ready × value / target`.
    pub fn is_latency(self) -> bool {
        self == MetricKind::QueueWaitP95
    }

    pub fn parse(source: MetricSource, name: &str) -> Option<MetricKind> {
        MetricKind::ALL.into_iter().find(|k| k.source() == source && k.name() == name)
    }

    fn known_names(source: MetricSource) -> String {
        let names: Vec<_> = MetricKind::ALL.iter().filter(|k| k.source() == source).map(|k| k.name()).collect();
        names.join(", ")
    }
}

/// One metric and the per-replica value the autoscaler steers toward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricTarget {
    #[serde(default, skip_serializing_if = "MetricSource::is_engine")]
    pub source: MetricSource,
    /// e.g. `vllm:num_requests_waiting` (engine) or `concurrency` (gateway).
    pub name: String,
    /// The per-replica value to steer toward (for `queue_wait_p95_ms`, the latency itself).
    pub target: f64,
}

impl MetricTarget {
    /// The known metric, or `None` for a name `validate` would refuse.
    pub fn kind(&self) -> Option<MetricKind> {
        MetricKind::parse(self.source, &self.name)
    }
}

/// Latency objectives for `strategy: slo`, p95 over the requests the gateways completed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloTarget {
    /// Time to first token, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p95_ms: Option<f64>,
    /// Time per output token, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpot_p95_ms: Option<f64>,
}

macro_rules! defaults {
    ($($f:ident: $t:ty = $v:expr;)*) => {
        $(fn $f() -> $t { $v })*
        mod skip {
            use super::SpecDuration;
            $(pub(super) fn $f(v: &$t) -> bool { *v == super::$f() })*
        }
    };
}

defaults! {
    stable_window: SpecDuration = SpecDuration::from_secs(180);
    panic_window: SpecDuration = SpecDuration::from_secs(60);
    panic_threshold: f64 = 2.0;
    tolerance: f64 = 0.1;
    rate: f64 = 2.0;
    scale_down_delay: SpecDuration = SpecDuration::from_secs(300);
}

/// `spec.autoscaling`. New fields are omitted from the canonical JSON while they hold their
/// defaults, so a spec written in the original `{min, max, strategy, metric}` shape stores
/// the same JSON as before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscalingSpec {
    #[serde(default)]
    pub min: u32,
    pub max: u32,
    #[serde(default)]
    pub strategy: ScalingStrategy,
    /// One engine metric (the original shape); use `metrics` for several or for gateway ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<MetricTarget>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricTarget>,
    /// Required by, and only used by, `strategy: slo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloTarget>,
    /// Averaging window of stable decisions (KPA, APA, SLO scale-down). Default 180s.
    #[serde(default = "stable_window", skip_serializing_if = "skip::stable_window")]
    pub stable_window: SpecDuration,
    /// Averaging window of burst detection (KPA panic, SLO scale-up). Default 60s.
    #[serde(default = "panic_window", skip_serializing_if = "skip::panic_window")]
    pub panic_window: SpecDuration,
    /// KPA panics when the panic window asks for this many times the ready replicas. Default 2.0.
    #[serde(default = "panic_threshold", skip_serializing_if = "skip::panic_threshold")]
    pub panic_threshold: f64,
    /// APA: no scale-up while value/target ≤ 1 + this. Default 0.1.
    #[serde(default = "tolerance", skip_serializing_if = "skip::tolerance")]
    pub scale_up_tolerance: f64,
    /// APA: no scale-down while value/target ≥ 1 − this. Default 0.1.
    #[serde(default = "tolerance", skip_serializing_if = "skip::tolerance")]
    pub scale_down_tolerance: f64,
    /// APA: one decision grows to at most ceil(current × this). Default 2.0.
    #[serde(default = "rate", skip_serializing_if = "skip::rate")]
    pub max_scale_up_rate: f64,
    /// APA: one decision shrinks to no less than floor(current / this). Default 2.0.
    #[serde(default = "rate", skip_serializing_if = "skip::rate")]
    pub max_scale_down_rate: f64,
    /// A lower recommendation must hold this long before replicas are removed. Default 300s.
    #[serde(default = "scale_down_delay", skip_serializing_if = "skip::scale_down_delay")]
    pub scale_down_delay: SpecDuration,
    /// Time windows with their own bounds; the first active one wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<Schedule>,
}

impl Default for AutoscalingSpec {
    /// `{min: 0, max: 1, strategy: kpa}` with every default and no metric (not valid alone).
    fn default() -> Self {
        AutoscalingSpec {
            min: 0,
            max: 1,
            strategy: ScalingStrategy::Kpa,
            metric: None,
            metrics: Vec::new(),
            slo: None,
            stable_window: stable_window(),
            panic_window: panic_window(),
            panic_threshold: panic_threshold(),
            scale_up_tolerance: tolerance(),
            scale_down_tolerance: tolerance(),
            max_scale_up_rate: rate(),
            max_scale_down_rate: rate(),
            scale_down_delay: scale_down_delay(),
            schedules: Vec::new(),
        }
    }
}

fn positive(field: &str, v: f64) -> Result<(), ApiError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(ApiError::invalid(field, format!("{v} must be a positive number")))
    }
}

fn over_one(field: &str, v: f64) -> Result<(), ApiError> {
    if v.is_finite() && v > 1.0 {
        Ok(())
    } else {
        Err(ApiError::invalid(field, format!("{v} must be a number greater than 1")))
    }
}

fn fraction(field: &str, v: f64) -> Result<(), ApiError> {
    if (0.0..1.0).contains(&v) {
        Ok(())
    } else {
        Err(ApiError::invalid(field, format!("{v} must be at least 0 and below 1")))
    }
}

impl AutoscalingSpec {
    /// Every metric to scale on: `metric` (the original single-metric shape) or `metrics`.
    pub fn metric_targets(&self) -> impl Iterator<Item = &MetricTarget> {
        self.metric.iter().chain(self.metrics.iter())
    }

    /// The bounds in force at `unix_ms` (wall clock): the first active schedule's, else the
    /// spec's own.
    pub fn bounds_at(&self, unix_ms: i64) -> Bounds {
        schedule::bounds_at(self, unix_ms)
    }

    /// Checks ranges and relations; `at` is the field path of this spec (`spec.autoscaling`).
    pub fn validate(&self, at: &str) -> Result<(), ApiError> {
        at_most(&format!("{at}.max"), self.max, MAX_REPLICAS)?;
        if self.min > self.max {
            return Err(ApiError::invalid(
                format!("{at}.min"),
                format!("{} is greater than {at}.max {}", self.min, self.max),
            ));
        }
        self.validate_signals(at)?;
        let window = |name: &str, d: SpecDuration, lo: SpecDuration, hi: SpecDuration| {
            if d < lo || d > hi {
                return Err(ApiError::invalid(format!("{at}.{name}"), format!("{d} is outside {lo} to {hi}")));
            }
            Ok(())
        };
        window("stable_window", self.stable_window, SpecDuration::from_secs(1), MAX_WINDOW)?;
        window("panic_window", self.panic_window, SpecDuration::from_secs(1), MAX_WINDOW)?;
        if self.panic_window > self.stable_window {
            return Err(ApiError::invalid(
                format!("{at}.panic_window"),
                format!("{} is longer than {at}.stable_window {}", self.panic_window, self.stable_window),
            ));
        }
        window("scale_down_delay", self.scale_down_delay, SpecDuration::ZERO, MAX_SCALE_DOWN_DELAY)?;
        over_one(&format!("{at}.panic_threshold"), self.panic_threshold)?;
        fraction(&format!("{at}.scale_up_tolerance"), self.scale_up_tolerance)?;
        fraction(&format!("{at}.scale_down_tolerance"), self.scale_down_tolerance)?;
        over_one(&format!("{at}.max_scale_up_rate"), self.max_scale_up_rate)?;
        over_one(&format!("{at}.max_scale_down_rate"), self.max_scale_down_rate)?;
        at_most(&format!("{at}.schedules"), self.schedules.len(), MAX_SCHEDULES)?;
        for (i, s) in self.schedules.iter().enumerate() {
            s.validate(&format!("{at}.schedules[{i}]"), self)?;
        }
        Ok(())
    }

    fn validate_signals(&self, at: &str) -> Result<(), ApiError> {
        if self.metric.is_some() && !self.metrics.is_empty() {
            return Err(ApiError::invalid(format!("{at}.metric"), "give either metric or metrics, not both"));
        }
        at_most(&format!("{at}.metrics"), self.metrics.len(), MAX_METRICS)?;
        let fields: Vec<String> = match &self.metric {
            Some(_) => vec![format!("{at}.metric")],
            None => (0..self.metrics.len()).map(|i| format!("{at}.metrics[{i}]")).collect(),
        };
        let mut seen = Vec::new();
        for (m, field) in self.metric_targets().zip(&fields) {
            positive(&format!("{field}.target"), m.target)?;
            let Some(kind) = m.kind() else {
                let source = match m.source {
                    MetricSource::Engine => "engine",
                    MetricSource::Gateway => "gateway",
                };
                return Err(ApiError::invalid(
                    format!("{field}.name"),
                    format!(
                        "{:?} is not a known {source} metric; known {source} metrics: {}",
                        m.name,
                        MetricKind::known_names(m.source)
                    ),
                ));
            };
            if seen.contains(&kind) {
                return Err(ApiError::invalid(format!("{field}.name"), format!("{:?} is listed twice", m.name)));
            }
            seen.push(kind);
            if kind == MetricKind::KvCacheUsage && m.target > 1.0 {
                return Err(ApiError::invalid(
                    format!("{field}.target"),
                    format!("{} is over 1 (vllm:kv_cache_usage_perc is a fraction in [0, 1])", m.target),
                ));
            }
        }
        let strategy = self.strategy.as_str();
        match (self.strategy, &self.slo) {
            (ScalingStrategy::Slo, None) => Err(ApiError::invalid(
                format!("{at}.slo"),
                "strategy slo needs slo: {ttft_p95_ms: N, tpot_p95_ms: N} (one or both)",
            )),
            (ScalingStrategy::Slo, Some(slo)) => {
                if !seen.is_empty() {
                    return Err(ApiError::invalid(
                        fields[0].clone(),
                        "strategy slo scales on slo only; remove the metrics or pick kpa, apa or hpa",
                    ));
                }
                if slo.ttft_p95_ms.is_none() && slo.tpot_p95_ms.is_none() {
                    return Err(ApiError::invalid(format!("{at}.slo"), "sets neither ttft_p95_ms nor tpot_p95_ms"));
                }
                if let Some(v) = slo.ttft_p95_ms {
                    positive(&format!("{at}.slo.ttft_p95_ms"), v)?;
                }
                if let Some(v) = slo.tpot_p95_ms {
                    positive(&format!("{at}.slo.tpot_p95_ms"), v)?;
                }
                Ok(())
            }
            (_, Some(_)) => Err(ApiError::invalid(
                format!("{at}.slo"),
                format!("is only used by strategy slo, and strategy is {strategy}"),
            )),
            (_, None) if seen.is_empty() => Err(ApiError::invalid(
                format!("{at}.metrics"),
                format!("strategy {strategy} needs a metric to scale on: set metric or metrics"),
            )),
            (_, None) => Ok(()),
        }
    }
}
