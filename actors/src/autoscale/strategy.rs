//! The metric strategies' recommendations, before bounds, scale from zero, the unknown
//! rule and the scale-down delay (`super::decide` applies those):
//!
//! - KPA: `ceil(total / target)` over the stable window; panic while the panic window asks
//!   for ≥ `panic_threshold` × ready replicas: take the panic window's count, never less
//!   than the most recent one, until the threshold has not been crossed for a stable window.
//! - APA: `ceil(total / target)` over the stable window unless value/target lies within
//!   `[1 − scale_down_tolerance, 1 + scale_up_tolerance]`; each move limited to
//!   `ceil(current × max_scale_up_rate)` up and `floor(current / max_scale_down_rate)` down.
//! - HPA: `ceil(ready × value / target)` on the newest samples, replicas still starting
//!   counted idle on the way up and at target on the way down (as Kubernetes does).
//!
//! With several metrics, each gives a count and the largest wins. A latency metric
//! (`queue_wait_p95_ms`) wants `ready × value / target` replicas.
use flotilla_api::spec::{AutoscalingSpec, MetricKind, MetricTarget, SpecDuration};

use super::signals::{Reading, Signals, Span};
use super::{ceil_replicas, num, Observed, Recommendation, ScalerState};

/// One metric's reading turned into a replica count.
struct Eval<'a> {
    metric: &'a MetricTarget,
    kind: Option<MetricKind>,
    reading: Reading,
    /// Replicas wanted, unrounded; `None` when nothing about the metric is known.
    raw: Option<f64>,
    /// The value shown against the target: per replica for loads, the value for latencies.
    value: Option<f64>,
}

impl Eval<'_> {
    fn desired(&self) -> u32 {
        self.raw.map_or(0, ceil_replicas)
    }

    fn unknown(&self) -> Option<String> {
        let name = &self.metric.name;
        match (self.kind, self.reading) {
            (None, _) => Some(format!("{name} is not a metric flotilla knows")),
            (Some(k), r) if !r.is_complete() && k.source() == flotilla_api::spec::MetricSource::Engine => {
                Some(format!("{name} unknown for {} of {} replicas", r.unknown, r.known + r.unknown))
            }
            (Some(_), r) if !r.is_complete() => Some(format!("{name} unknown (no fresh gateway report)")),
            _ => None,
        }
    }

    fn describe(&self, over: &str) -> String {
        let m = self.metric;
        let value = self.value.map_or("unknown".to_string(), num);
        let per = if self.kind.is_some_and(MetricKind::is_latency) { "" } else { " per replica" };
        format!("{} {value}{per}{over} vs target {}", m.name, num(m.target))
    }

    fn observed(&self) -> Observed {
        Observed { name: self.metric.name.clone(), value: self.value, target: self.metric.target }
    }
}

fn eval<'a>(signals: &Signals, m: &'a MetricTarget, now_ms: u64, span: Span, ready: u32) -> Eval<'a> {
    let Some(kind) = m.kind() else {
        return Eval {
            metric: m,
            kind: None,
            reading: Reading { total: 0.0, known: 0, unknown: 1 },
            raw: None,
            value: None,
        };
    };
    let reading = signals.reading(kind, now_ms, span, ready);
    let (raw, value) = if kind.is_latency() {
        match reading.known {
            0 => (None, None),
            _ => (Some(f64::from(ready.max(1)) * reading.total / m.target), Some(reading.total)),
        }
    } else if reading.known == 0 && reading.unknown > 0 {
        (Some(0.0), None)
    } else {
        let per = reading.total / f64::from(ready.max(reading.known).max(1));
        (Some(reading.total / m.target), Some(per))
    };
    Eval { metric: m, kind: Some(kind), reading, raw, value }
}

fn evals<'a>(spec: &'a AutoscalingSpec, signals: &Signals, now_ms: u64, span: Span, ready: u32) -> Vec<Eval<'a>> {
    spec.metric_targets().map(|m| eval(signals, m, now_ms, span, ready)).collect()
}

/// The eval asking for the most replicas (the first on ties).
fn top<'e, 'a>(evals: &'e [Eval<'a>]) -> Option<&'e Eval<'a>> {
    evals.iter().reduce(|a, b| if b.desired() > a.desired() { b } else { a })
}

fn unknowns(evals: &[Eval]) -> Option<String> {
    let all: Vec<String> = evals.iter().filter_map(Eval::unknown).collect();
    (!all.is_empty()).then(|| all.join(", "))
}

fn over(d: SpecDuration) -> String {
    format!(" over {d}")
}

pub(crate) fn kpa(
    spec: &AutoscalingSpec,
    signals: &Signals,
    current: u32,
    ready: u32,
    state: &mut ScalerState,
    now_ms: u64,
) -> Recommendation {
    let stable = evals(spec, signals, now_ms, Span::Over(spec.stable_window.as_millis()), ready);
    let panic = evals(spec, signals, now_ms, Span::Over(spec.panic_window.as_millis()), ready);
    let (Some(s), Some(p)) = (top(&stable), top(&panic)) else {
        return Recommendation::hold(current, "no metric to scale on");
    };
    let (desired_stable, desired_panic) = (s.desired(), p.desired());
    let base = ready.max(1);
    let over_threshold = f64::from(desired_panic) >= spec.panic_threshold * f64::from(base);
    if over_threshold {
        if state.panic_since_ms.is_none() {
            state.max_panic = current;
        }
        state.panic_since_ms = Some(now_ms);
    } else if state.panic_since_ms.is_some_and(|t| now_ms.saturating_sub(t) >= spec.stable_window.as_millis()) {
        state.panic_since_ms = None;
        state.max_panic = 0;
    }
    let mut rec = Recommendation {
        desired: desired_stable,
        reason: format!("stable: {}", s.describe(&over(spec.stable_window))),
        unknown: unknowns(&stable).or_else(|| unknowns(&panic)),
        panicking: false,
        metrics: stable.iter().map(Eval::observed).collect(),
    };
    if state.panic_since_ms.is_some() {
        let desired = desired_panic.max(state.max_panic).max(current);
        state.max_panic = desired;
        rec.panicking = true;
        rec.desired = desired;
        rec.reason = if over_threshold {
            format!(
                "panic: {} (x{} threshold over {} ready)",
                p.describe(&over(spec.panic_window)),
                num(spec.panic_threshold),
                ready
            )
        } else {
            format!(
                "panic: holding {desired} until the panic window stays under x{} for {}",
                num(spec.panic_threshold),
                spec.stable_window
            )
        };
    }
    rec
}

/// The largest of the per-metric counts (the first on a tie), with its reason line.
fn largest(current: u32, evals: &[Eval], counts: impl IntoIterator<Item = (u32, String)>) -> Recommendation {
    let Some((desired, reason)) = counts.into_iter().reduce(|a, b| if b.0 > a.0 { b } else { a }) else {
        return Recommendation::hold(current, "no metric to scale on");
    };
    Recommendation {
        desired,
        reason,
        unknown: unknowns(evals),
        panicking: false,
        metrics: evals.iter().map(Eval::observed).collect(),
    }
}

pub(crate) fn apa(spec: &AutoscalingSpec, signals: &Signals, current: u32, ready: u32, now_ms: u64) -> Recommendation {
    let evals = evals(spec, signals, now_ms, Span::Over(spec.stable_window.as_millis()), ready);
    let (lo, hi) = (1.0 - spec.scale_down_tolerance, 1.0 + spec.scale_up_tolerance);
    let up_limit = ceil_replicas(f64::from(current.max(1)) * spec.max_scale_up_rate);
    let down_limit = (f64::from(current) / spec.max_scale_down_rate).floor() as u32;
    let counts = evals.iter().map(|e| {
        let (desired, why) = match (e.raw, e.value) {
            (Some(raw), Some(value)) => {
                let ratio = value / e.metric.target;
                if current > 0 && (lo..=hi).contains(&ratio) {
                    (current, format!("within tolerance ({}–{} of target)", num(lo), num(hi)))
                } else {
                    let want = ceil_replicas(raw);
                    let limited = want.min(up_limit).max(down_limit);
                    let why = match want.cmp(&limited) {
                        std::cmp::Ordering::Greater => {
                            format!("wants {want}, limited by max_scale_up_rate {}", num(spec.max_scale_up_rate))
                        }
                        std::cmp::Ordering::Less => {
                            format!("wants {want}, limited by max_scale_down_rate {}", num(spec.max_scale_down_rate))
                        }
                        std::cmp::Ordering::Equal => format!("wants {want}"),
                    };
                    (limited, why)
                }
            }
            _ => (0, "unknown".to_string()),
        };
        (desired, format!("apa: {}, {why}", e.describe(&over(spec.stable_window))))
    });
    largest(current, &evals, counts)
}

pub(crate) fn hpa(spec: &AutoscalingSpec, signals: &Signals, current: u32, ready: u32, now_ms: u64) -> Recommendation {
    let evals = evals(spec, signals, now_ms, Span::Latest, ready);
    let starting = current.saturating_sub(ready);
    let counts = evals.iter().filter_map(|e| {
        let ratio = e.value? / e.metric.target;
        // As the Kubernetes HPA: the value is per ready replica; on the way up a replica
        // still starting counts as idle (so each evaluation does not multiply the same
        // overload again while it starts), on the way down as exactly at target.
        let by_ready = ceil_replicas(f64::from(ready) * ratio);
        let (desired, tail) = if ratio >= 1.0 {
            (
                by_ready.max(current),
                if by_ready < current { format!(", {current} kept ({starting} starting)") } else { String::new() },
            )
        } else {
            (by_ready + starting, if starting > 0 { format!(" + {starting} starting") } else { String::new() })
        };
        Some((desired, format!("hpa: {}, ceil({ready} × {}){tail} = {desired}", e.describe(""), num(ratio))))
    });
    largest(current, &evals, counts)
}
