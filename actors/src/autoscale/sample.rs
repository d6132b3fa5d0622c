//! The autoscaler's sampling, pure: which replicas count as serving, one engine sample
//! from an agent's latest report (the generation-token rate from the counter seen at the
//! previous sample), and the gateway sample from the gateways' summed demand. The actor
//! reads the store and memory, calls these, and records the samples into its `Signals`.
//!
//! ```text
//!  replicas + down nodes ──serving──> ready replicas
//!  report + last TokenMark ──engine_sample──> EngineSample (+ the next TokenMark)
//!  Demand (gateways) ──gateway_sample──> GatewaySample
//! ```
use std::collections::BTreeSet;

use flotilla_api::pb::EngineReport;
use flotilla_api::spec::ReplicaPhase;
use flotilla_api::ObjectName;

use super::service::Demand;
use super::{EngineSample, GatewaySample};
use crate::objects::ReplicaView;

/// A replica's generation-tokens counter as last sampled: (monotonic ms, tokens).
pub type TokenMark = (u64, f64);

/// The replicas that serve: Ready, and bound to a node that is not down.
pub fn serving<'a>(replicas: &'a [ReplicaView], down: &BTreeSet<ObjectName>) -> Vec<&'a ReplicaView> {
    replicas
        .iter()
        .filter(|r| r.phase() == ReplicaPhase::Ready && r.spec.node.as_ref().is_some_and(|n| !down.contains(n)))
        .collect()
}

/// One replica's sample from its engine's latest report (`None`: none came), given the
/// token counter seen last time; and the mark to keep for next time (`None`: keep the old
/// one). No report, or one without known figures, is unknown, never idle. The token rate
/// is unknown on the first sample, when no time passed, and when the counter went back
/// (the engine restarted).
pub fn engine_sample(
    report: Option<&EngineReport>,
    last: Option<TokenMark>,
    now_ms: u64,
) -> (EngineSample, Option<TokenMark>) {
    let Some(e) = report.filter(|e| e.metrics_known) else { return (EngineSample::default(), None) };
    let rate = match last {
        Some((t, total)) if now_ms > t && e.generation_tokens_total >= total => {
            Some((e.generation_tokens_total - total) * 1000.0 / (now_ms - t) as f64)
        }
        _ => None,
    };
    let sample = EngineSample {
        running: Some(e.num_requests_running),
        waiting: Some(e.num_requests_waiting),
        kv_cache_usage: Some(e.kv_cache_usage),
        generation_tokens_per_s: rate,
    };
    (sample, Some((now_ms, e.generation_tokens_total)))
}

/// The gateways' summed demand as a sample; a p95 of 0 (nothing completed) is unknown.
pub fn gateway_sample(d: &Demand) -> GatewaySample {
    let some = |v: f64| (v > 0.0).then_some(v);
    GatewaySample {
        in_flight: d.in_flight,
        queued: d.queued,
        held: d.held,
        arrivals_per_s: d.arrivals_per_s,
        completed_per_s: d.completed_per_s,
        ttft_p95_ms: some(d.ttft_p95_ms),
        tpot_p95_ms: some(d.tpot_p95_ms),
        queue_wait_p95_ms: some(d.queue_wait_p95_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{name, World};

    #[test]
    fn serving_is_ready_on_a_node_that_is_up() {
        let mut w = World::default();
        w.node("up", 8, "A");
        w.node("down", 8, "A");
        // (replica, phase, node) -> serving
        let cases = [
            ("r-ready", ReplicaPhase::Ready, Some("up"), true),
            ("r-down", ReplicaPhase::Ready, Some("down"), false),
            ("r-starting", ReplicaPhase::Starting, Some("up"), false),
            ("r-draining", ReplicaPhase::Draining, Some("up"), false),
            ("r-failed", ReplicaPhase::Failed, Some("up"), false),
            ("r-unbound", ReplicaPhase::Ready, None, false),
        ];
        for (i, (r, phase, node, _)) in cases.iter().enumerate() {
            w.replica(r, "m", 1, *phase, node.map(|n| (n, vec![i as u32])));
        }
        let replicas = w.replicas();
        let down = BTreeSet::from([name("down")]);
        let got: BTreeSet<String> = serving(&replicas, &down).iter().map(|r| r.name.to_string()).collect();
        for (r, _, _, want) in cases {
            assert_eq!(got.contains(r), want, "{r}");
        }
    }

    fn report(known: bool, tokens: f64) -> EngineReport {
        EngineReport {
            num_requests_running: 3.0,
            num_requests_waiting: 1.0,
            kv_cache_usage: 0.5,
            generation_tokens_total: tokens,
            metrics_known: known,
            ..Default::default()
        }
    }

    #[test]
    fn engine_samples_and_token_rates() {
        let known = |rate: Option<f64>| EngineSample {
            running: Some(3.0),
            waiting: Some(1.0),
            kv_cache_usage: Some(0.5),
            generation_tokens_per_s: rate,
        };
        // (report, last mark, now) -> (sample, next mark)
        let cases = [
            (None, Some((1_000, 10.0)), 2_000, EngineSample::default(), None),
            (Some(report(false, 50.0)), Some((1_000, 10.0)), 2_000, EngineSample::default(), None),
            (Some(report(true, 50.0)), None, 2_000, known(None), Some((2_000, 50.0))),
            (Some(report(true, 50.0)), Some((1_000, 10.0)), 2_000, known(Some(40.0)), Some((2_000, 50.0))),
            (Some(report(true, 50.0)), Some((1_500, 10.0)), 2_000, known(Some(80.0)), Some((2_000, 50.0))),
            (Some(report(true, 5.0)), Some((1_000, 10.0)), 2_000, known(None), Some((2_000, 5.0))),
            (Some(report(true, 50.0)), Some((2_000, 10.0)), 2_000, known(None), Some((2_000, 50.0))),
        ];
        for (i, (r, last, now, want, mark)) in cases.into_iter().enumerate() {
            assert_eq!(engine_sample(r.as_ref(), last, now), (want, mark), "case {i}");
        }
    }

    #[test]
    fn gateway_samples_treat_a_zero_p95_as_unknown() {
        let d = Demand {
            gateways: 2,
            in_flight: 4.0,
            queued: 1.0,
            held: 2.0,
            arrivals_per_s: 7.5,
            completed_per_s: 6.0,
            rejected_per_s: 0.5,
            ttft_p95_ms: 120.0,
            tpot_p95_ms: 0.0,
            queue_wait_p95_ms: 30.0,
        };
        let want = GatewaySample {
            in_flight: 4.0,
            queued: 1.0,
            held: 2.0,
            arrivals_per_s: 7.5,
            completed_per_s: 6.0,
            ttft_p95_ms: Some(120.0),
            tpot_p95_ms: None,
            queue_wait_p95_ms: Some(30.0),
        };
        assert_eq!(gateway_sample(&d), want);
        let idle = gateway_sample(&Demand::default());
        assert_eq!((idle.ttft_p95_ms, idle.tpot_p95_ms, idle.queue_wait_p95_ms), (None, None, None));
    }
}
