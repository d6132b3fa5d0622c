//! SLO mode on a simulated engine whose TTFT p95 grows as `200 ms / (1 − utilisation)`
//! with a true capacity of 10 requests/s per replica: it learns the capacity, scales up
//! as p95 nears the target and down to what the capacity says keeps it, and holds when it
//! cannot know.
use super::series::{spec, Replay, Tick};
use super::*;

const TRUE_CAPACITY: f64 = 10.0;

/// One second of `rps` requests/s on `ready` replicas.
fn traffic(rps: f64, ready: u32) -> Tick {
    let capacity = f64::from(ready) * TRUE_CAPACITY;
    let utilisation = if capacity == 0.0 { 0.99 } else { (rps / capacity).min(0.99) };
    let completed = rps.min(capacity);
    let g = GatewaySample {
        in_flight: completed * 0.5,
        queued: (rps - completed).max(0.0) * 5.0,
        held: if ready == 0 { rps } else { 0.0 },
        arrivals_per_s: rps,
        completed_per_s: completed,
        ttft_p95_ms: (completed > 0.0).then(|| 200.0 / (1.0 - utilisation)),
        tpot_p95_ms: (completed > 0.0).then_some(30.0),
        queue_wait_p95_ms: None,
    };
    Tick { engine: Vec::new(), gateway: Some(g) }
}

fn slo_spec() -> AutoscalingSpec {
    spec("{min: 1, max: 40, strategy: slo, slo: {ttft_p95_ms: 1000, tpot_p95_ms: 100}}")
}

#[test]
fn slo_scales_up_as_p95_nears_the_target_using_the_measured_capacity() {
    let mut r = Replay::new(slo_spec(), 2);
    // 8 requests/s on 2 replicas: utilisation 0.4, p95 333 ms. 4/s per replica is proven.
    let d = r.run(120, |_, ready| traffic(8.0, ready));
    assert_eq!(d.desired, 2, "{}", d.reason);
    assert_eq!(r.state.capacity_per_replica(), Some(4.0));
    assert!(d.reason.contains("fit 2 replicas at capacity 4/s per replica"), "{}", d.reason);
    assert_eq!(d.metrics[0].name, "ttft_p95_ms");
    // A surge to 30/s saturates both replicas: p95 shoots past 90% of the target.
    r.run(90, |_, ready| traffic(30.0, ready));
    let up = r.first(120, |d| d.desired > 2).expect("scaled up");
    assert!(up <= 123, "up at {up}");
    let first = &r.log[(up - 1) as usize].1;
    assert!(first.reason.starts_with("slo: ttft_p95_ms "), "{}", first.reason);
    assert!(first.reason.contains("of target 1000ms (scale up past 90%)"), "{}", first.reason);
    // It settles where the measured capacity says 30/s fits: ceil(30 / 4) = 8, not far past.
    let settled = r.log.last().unwrap().1.desired;
    assert!((8..=10).contains(&settled), "{settled}: {:?}", r.log.last());
    let d = r.run(600, |_, ready| traffic(30.0, ready));
    assert!((8..=10).contains(&d.desired), "{}", d.reason);
    assert!(r.log.iter().all(|(_, d)| d.desired <= 10), "no runaway while the window still holds the overload");
}

#[test]
fn slo_scales_down_to_what_the_capacity_keeps_after_the_delay() {
    let mut r = Replay::new(slo_spec(), 8);
    let d = r.run(240, |_, ready| traffic(32.0, ready));
    assert_eq!((d.desired, r.state.capacity_per_replica()), (8, Some(4.0)), "{}", d.reason);
    let drop = r.now_ms / 1000;
    let d = r.run(900, |_, ready| traffic(8.0, ready));
    assert_eq!(d.desired, 2, "ceil(8 / 4): {}", d.reason);
    let down = r.first(drop, |d| d.desired < 8).unwrap();
    assert!(down >= drop + 300, "down at {down}, before the delay");
    // 2 replicas at 8/s: utilisation 0.4, within the SLO.
    assert!(d.metrics[0].value.unwrap() < 900.0, "{:?}", d.metrics);
}

#[test]
fn slo_holds_without_a_capacity_or_latencies() {
    // Requests arrive but none completes (long generations): latency unknown, hold.
    let mut r = Replay::new(slo_spec(), 6);
    let d = r.run(400, |_, _| {
        let mut t = traffic(4.0, 6);
        let g = t.gateway.as_mut().unwrap();
        (g.completed_per_s, g.ttft_p95_ms, g.tpot_p95_ms) = (0.0, None, None);
        t
    });
    assert_eq!(r.state.capacity_per_replica(), None);
    assert_eq!(d.desired, 6, "{}", d.reason);
    assert!(d.reason.contains("no request completed"), "{}", d.reason);
    // Gateways silent: unknown, hold.
    let d = r.run(600, |_, _| Tick::default());
    assert_eq!(d.desired, 6, "{}", d.reason);
    assert!(d.reason.contains("gateway latencies unknown"), "{}", d.reason);
    // Idle gateways: zero demand scales down to min after the delay.
    let d = r.run(900, |_, _| traffic(0.0, 6));
    assert_eq!(d.desired, 1, "{}", d.reason);
}
