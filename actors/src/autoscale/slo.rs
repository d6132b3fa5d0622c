//! `strategy: slo`: scale on the gateways' observed p95 latencies against `spec.slo`,
//! using a measured capacity per replica.
//!
//! ```text
//!  r = max over set targets of p95 / target        (panic window for up, stable for down)
//!  capacity C = requests completed/s per ready replica, learned each evaluation in which
//!  the ready count held for the whole panic window:
//!      r ≤ 0.9  → C = max(C, throughput)   (this much is proven to keep the SLO)
//!      r > 1.0  → C = min(C, throughput)   (this much already breaks it)
//!  up   (r_panic > 0.9):  max(ready + 1, ceil(arrivals_panic / C), current), at once;
//!                         the +1 step only once the ready count held for a panic window
//!  down (r_stable ≤ 0.9): min(current, ceil(arrivals_stable / C)), after the delay
//!  idle: 0 (then min, scale to zero rules); otherwise hold
//! ```
//! Up steps from the ready count and only when it has settled, so replicas still starting
//! (or just started, with the window still full of the overload) are not added again each
//! second; with no capacity measured yet scale-up is one replica at a time and scale-down
//! waits until a capacity is known. Capacity lives in `ScalerState` (memory only).
use flotilla_api::spec::{AutoscalingSpec, SloTarget};

use super::signals::{Signals, Span};
use super::window::Window;
use super::{ceil_replicas, num, Observed, Recommendation, ScalerState};

/// Scale up when p95 passes this fraction of its target.
pub const APPROACH: f64 = 0.9;

/// The worst latency against its target over `span`: (ratio, name, value, target).
fn worst(signals: &Signals, slo: &SloTarget, now_ms: u64, span: Span) -> Option<(f64, &'static str, f64, f64)> {
    let g = &signals.gateway;
    let targets: [(&'static str, Option<f64>, &Window); 2] =
        [("ttft_p95_ms", slo.ttft_p95_ms, &g.ttft_p95), ("tpot_p95_ms", slo.tpot_p95_ms, &g.tpot_p95)];
    targets
        .into_iter()
        .filter_map(|(name, target, w)| {
            let target = target?;
            let v = signals.gateway_value(w, now_ms, span)?;
            Some((v / target, name, v, target))
        })
        .reduce(|a, b| if b.0 > a.0 { b } else { a })
}

fn pct(r: f64) -> String {
    format!("{}%", (r * 100.0).round())
}

pub(crate) fn slo(
    spec: &AutoscalingSpec,
    signals: &Signals,
    current: u32,
    ready: u32,
    state: &mut ScalerState,
    now_ms: u64,
) -> Recommendation {
    let Some(slo) = &spec.slo else {
        return Recommendation::hold(current, "slo: no slo targets");
    };
    if !signals.gateway_fresh(now_ms) {
        let what = "gateway latencies unknown (no fresh gateway report)";
        let mut rec = Recommendation::hold(current, &format!("slo: holding; {what}"));
        rec.unknown = Some(what.into());
        return rec;
    }
    let (panic_w, stable_w) = (spec.panic_window, spec.stable_window);
    let (fast, slow) = (Span::Over(panic_w.as_millis()), Span::Over(stable_w.as_millis()));
    let g = &signals.gateway;
    let r_fast = worst(signals, slo, now_ms, fast);
    let r_slow = worst(signals, slo, now_ms, slow);
    let demand_fast = signals.gateway_value(&g.arrivals, now_ms, fast).unwrap_or(0.0);
    let demand_slow = signals.gateway_value(&g.arrivals, now_ms, slow).unwrap_or(0.0);
    let completed = signals.gateway_value(&g.completed, now_ms, fast).unwrap_or(0.0);
    // One-replica steps wait until the ready count has held for a panic window, so a
    // latency window still full of the old overload does not add replicas every second.
    let seen_since = match state.ready_seen {
        Some((n, since)) if n == ready => since,
        Some(_) => Some(now_ms),
        None => None,
    };
    state.ready_seen = Some((ready, seen_since));
    // Throughput per replica means something only if the ready count held over the window.
    let steady = seen_since.is_none_or(|t| now_ms.saturating_sub(t) >= panic_w.as_millis());
    let settled = steady && current == ready;
    if let (Some((r, ..)), true, true) = (r_fast, steady && ready > 0, completed > 0.0) {
        let throughput = completed / f64::from(ready);
        if r <= APPROACH {
            state.capacity_rps = Some(state.capacity_rps.map_or(throughput, |c| c.max(throughput)));
        } else if r > 1.0 {
            state.capacity_rps = Some(state.capacity_rps.map_or(throughput, |c| c.min(throughput)));
        }
    }
    let cap = state.capacity_rps;
    let mut metrics = Vec::new();
    for (name, target, w) in
        [("ttft_p95_ms", slo.ttft_p95_ms, &g.ttft_p95), ("tpot_p95_ms", slo.tpot_p95_ms, &g.tpot_p95)]
    {
        if let Some(target) = target {
            metrics.push(Observed { name: name.into(), value: signals.gateway_value(w, now_ms, fast), target });
        }
    }
    if let Some(c) = cap {
        let per = demand_slow / f64::from(ready.max(1));
        metrics.push(Observed { name: "requests_per_second".into(), value: Some(per), target: c });
    }
    let cap_text = cap.map_or("capacity not measured yet".into(), |c| format!("capacity {}/s per replica", num(c)));
    let hold = |reason: String, unknown: Option<String>| Recommendation {
        desired: current,
        reason,
        unknown,
        panicking: false,
        metrics: metrics.clone(),
    };
    if let Some((r, name, v, t)) = r_fast.filter(|w| w.0 > APPROACH) {
        let by_cap = cap.map_or(0, |c| ceil_replicas(demand_fast / c));
        let step = if settled { ready + 1 } else { current };
        let desired = step.max(by_cap).max(current).max(1);
        let reason = format!(
            "slo: {name} {}ms over {panic_w} is {} of target {}ms (scale up past {}); {} requests/s, {cap_text}",
            num(v),
            pct(r),
            num(t),
            pct(APPROACH),
            num(demand_fast)
        );
        return Recommendation { desired, reason, unknown: None, panicking: false, metrics };
    }
    if signals.is_idle(now_ms, stable_w.as_millis()) {
        return Recommendation {
            desired: 0,
            reason: format!("slo: idle, no requests over {stable_w}"),
            unknown: None,
            panicking: false,
            metrics,
        };
    }
    match (r_slow, cap) {
        (None, _) => hold(
            format!("slo: holding; no request completed over {stable_w}"),
            Some(format!("latency unknown: no request completed over {stable_w}")),
        ),
        (Some((r, name, v, _)), _) if r > APPROACH => {
            hold(format!("slo: holding; {name} {}ms over {stable_w} is {} of target", num(v), pct(r)), None)
        }
        (Some(_), None) => hold(format!("slo: holding; under target, {cap_text}"), None),
        (Some((r, name, v, _)), Some(c)) => {
            let desired = ceil_replicas(demand_slow / c).max(1).min(current.max(1));
            let reason = format!(
                "slo: {name} {}ms over {stable_w} is {} of target; {} requests/s fit {desired} replicas at {cap_text}",
                num(v),
                pct(r),
                num(demand_slow)
            );
            Recommendation { desired, reason, unknown: None, panicking: false, metrics }
        }
    }
}
