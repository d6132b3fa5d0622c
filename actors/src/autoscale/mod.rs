//! The autoscaler's pure core: from a model's `spec.autoscaling`, its recorded signals,
//! its replica counts and the time, the desired replica count and one readable sentence
//! saying why. No I/O, no clock: the actor passes monotonic milliseconds (for windows and
//! delays) and the wall clock as Unix milliseconds (for schedules), and keeps the
//! [`ScalerState`] between calls. See `docs/autoscaling.md`. Beside it, the I/O: the
//! per-model autoscaler actor (`actor`: read, decide, write) and the `AutoscaleService`
//! the gateways report demand to (`service`).
//!
//! ```text
//!  Signals (windows) ─┐
//!  spec, current,     ├─> strategy (kpa | apa | slo | hpa) ─> recommendation
//!  ready, now         ┘        │ ScalerState: panic, capacity
//!                              v
//!   idle? (0 needs zero demand) ─> held > 0 ⇒ ≥ 1 ─> unknown signal ⇒ no scale-down
//!     ─> clamp to the active schedule's [min, max] ─> scale-down delay (not hpa)
//!     ─> Decision { desired, reason, metrics }
//! ```
pub mod actor;
pub mod sample;
pub mod service;
mod signals;
mod slo;
pub mod status;
mod strategy;
mod window;

#[cfg(test)]
mod series;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_slo;

use std::collections::VecDeque;

use flotilla_api::spec::{AutoscalingSpec, Bounds, ScalingStrategy};

pub use signals::{retention_ms, EngineSample, GatewaySample, Reading, Signals, Span};
pub use slo::APPROACH as SLO_APPROACH;
pub use window::Window;

/// One signal shown against its target (per replica for loads).
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub name: String,
    /// `None`: unknown.
    pub value: Option<f64>,
    pub target: f64,
}

/// What the autoscaler wants now.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: u32,
    /// One sentence, e.g. `panic: vllm:num_requests_waiting 38 per replica over 60s vs
    /// target 4 (x2 threshold over 2 ready)`.
    pub reason: String,
    pub metrics: Vec<Observed>,
    /// KPA is in panic mode.
    pub panicking: bool,
    /// The bounds in force (a schedule's or the spec's).
    pub bounds: Bounds,
}

/// What one model's autoscaler remembers between decisions (memory only; a new leader
/// starts fresh, which only delays scale-downs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScalerState {
    /// KPA: the last time the panic threshold was crossed; `Some` while panicking.
    panic_since_ms: Option<u64>,
    /// KPA: the highest count asked for in this panic.
    max_panic: u32,
    /// The bounded recommendations of the last `scale_down_delay`, oldest first.
    recent: VecDeque<(u64, u32)>,
    /// The first decision's time: the history covers `[first_ms, now]`.
    first_ms: Option<u64>,
    /// Since when the recommendation has stayed below the current count (for reasons).
    lower_since_ms: Option<u64>,
    /// SLO: requests/s one replica serves within the SLO.
    capacity_rps: Option<f64>,
    /// SLO: the ready count last seen and since when (`None`: since before we knew).
    ready_seen: Option<(u32, Option<u64>)>,
}

impl ScalerState {
    pub fn new() -> Self {
        ScalerState::default()
    }

    pub fn panicking(&self) -> bool {
        self.panic_since_ms.is_some()
    }

    /// SLO mode's measured requests/s per replica within the SLO.
    pub fn capacity_per_replica(&self) -> Option<f64> {
        self.capacity_rps
    }

    /// Since when a lower count has been recommended (waiting for `scale_down_delay`).
    pub fn scale_down_pending_since(&self) -> Option<u64> {
        self.lower_since_ms
    }
}

/// A strategy's recommendation before the common rules.
#[derive(Debug, Clone)]
pub(crate) struct Recommendation {
    pub desired: u32,
    pub reason: String,
    /// What is unknown, if anything: forbids scaling down.
    pub unknown: Option<String>,
    pub panicking: bool,
    pub metrics: Vec<Observed>,
}

impl Recommendation {
    fn hold(current: u32, reason: &str) -> Recommendation {
        Recommendation { desired: current, reason: reason.into(), unknown: None, panicking: false, metrics: Vec::new() }
    }
}

/// Replicas for an unrounded count: the ceiling, forgiving float noise (8.000000001 is 8).
pub(crate) fn ceil_replicas(x: f64) -> u32 {
    if x.is_nan() || x <= 0.0 {
        return 0;
    }
    (x - 1e-9).ceil().min(f64::from(u32::MAX)) as u32
}

/// A number for reasons: integers plainly, others with at most two decimals.
pub(crate) fn num(v: f64) -> String {
    if (v - v.round()).abs() < 0.005 {
        format!("{}", v.round())
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').to_string()
    }
}

/// Decides the desired replica count of one model.
///
/// `current`: the replica count now asked for (the model's `replicas`); `ready`: replicas
/// serving; `now_ms`: monotonic milliseconds, the clock the signals were recorded with;
/// `wall_unix_ms`: the wall clock, for schedules.
pub fn decide(
    spec: &AutoscalingSpec,
    signals: &Signals,
    current: u32,
    ready: u32,
    state: &mut ScalerState,
    now_ms: u64,
    wall_unix_ms: i64,
) -> Decision {
    let bounds = spec.bounds_at(wall_unix_ms);
    let rec = match spec.strategy {
        ScalingStrategy::Kpa => strategy::kpa(spec, signals, current, ready, state, now_ms),
        ScalingStrategy::Apa => strategy::apa(spec, signals, current, ready, now_ms),
        ScalingStrategy::Hpa => strategy::hpa(spec, signals, current, ready, now_ms),
        ScalingStrategy::Slo => slo::slo(spec, signals, current, ready, state, now_ms),
    };
    if !matches!(spec.strategy, ScalingStrategy::Kpa) {
        state.panic_since_ms = None;
    }
    let mut desired = rec.desired;
    let mut reason = rec.reason;
    let idle_span = spec.panic_window.as_millis();
    if desired == 0 && current > 0 && !signals.is_idle(now_ms, idle_span) {
        desired = 1;
        reason = format!("{reason}; keeps 1 until requests stop for {}", spec.panic_window);
    }
    let held = signals.held(now_ms);
    if held > 0.0 && (desired == 0 || current == 0) {
        desired = desired.max(1);
        reason = format!("scale from zero: {} requests held at the gateways; {reason}", num(held));
    }
    if let Some(what) = &rec.unknown {
        if desired < current {
            reason = format!("hold: {what}; no scale-down while a signal is unknown (would go to {desired})");
            desired = current;
        }
    }
    let clamped = bounds.clamp(desired);
    if clamped != desired {
        let whose = bounds.schedule.map_or("spec".to_string(), |i| format!("schedule {i}"));
        reason = format!("{reason}; clamped to {clamped} by the {whose} bounds [{}, {}]", bounds.min, bounds.max);
    }
    // Over the bounds' max (a schedule ended) comes down at once; the rest waits.
    let base = current.min(bounds.max);
    if base < current {
        reason = format!("{reason}; {current} is over max {} now", bounds.max);
    }
    let desired = scale_down_gate(spec, state, clamped, base, now_ms, &mut reason);
    Decision { desired, reason, metrics: rec.metrics, panicking: rec.panicking, bounds }
}

/// The scale-down delay: a count below `base` only once every bounded recommendation of
/// the last `scale_down_delay` was below it, and then the highest of them (a sliding
/// maximum, as Knative's and the HPA's stabilization windows). Up is immediate; `hpa` and
/// a zero delay skip the gate.
fn scale_down_gate(
    spec: &AutoscalingSpec,
    state: &mut ScalerState,
    clamped: u32,
    base: u32,
    now_ms: u64,
    reason: &mut String,
) -> u32 {
    let delay = spec.scale_down_delay.as_millis();
    let first = *state.first_ms.get_or_insert(now_ms);
    state.recent.push_back((now_ms, clamped));
    while state.recent.front().is_some_and(|r| r.0.saturating_add(delay) < now_ms) {
        state.recent.pop_front();
    }
    if clamped >= base || spec.strategy == ScalingStrategy::Hpa || delay == 0 {
        state.lower_since_ms = None;
        return clamped;
    }
    let since = *state.lower_since_ms.get_or_insert(now_ms);
    let highest = state.recent.iter().map(|r| r.1).max().unwrap_or(base);
    if now_ms.saturating_sub(first) >= delay && highest < base {
        state.lower_since_ms = None;
        *reason = format!("{reason}; lower than {base} for {}", spec.scale_down_delay);
        highest
    } else {
        let waited = now_ms.saturating_sub(since) / 1000;
        *reason = format!(
            "{reason}; scale-down to {clamped} waits for scale_down_delay ({waited}s of {})",
            spec.scale_down_delay
        );
        base
    }
}
