//! `decide` on recorded series: KPA bursts and panic, APA tolerance and rate limits, the
//! scale-down delay, unknown metrics, scale to zero and back, schedules, the HPA baseline.
use super::series::{gateway, spec, waiting, Replay, Tick};
use super::*;

const WAITING4: &str = "{name: 'vllm:num_requests_waiting', target: 4}";

/// A deterministic noise in [-1, 1].
fn noise(t: u64) -> f64 {
    let x = t.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    ((x >> 33) as f64 / f64::from(u32::MAX >> 1)) - 1.0
}

#[test]
fn kpa_burst_panics_and_scales_up_at_once() {
    let mut r = Replay::new(spec(&format!("{{min: 1, max: 50, metric: {WAITING4}}}")), 2);
    r.startup_ms = 30_000;
    // Steady: 6 waiting over 2 replicas is 2 replicas' worth.
    let d = r.run(240, |_, ready| waiting(6.0, ready));
    assert_eq!((d.desired, d.panicking), (2, false), "{}", d.reason);
    assert!(
        d.reason.starts_with("stable: vllm:num_requests_waiting 3 per replica over 180s vs target 4"),
        "{}",
        d.reason
    );
    // Burst: 80 waiting. The stable window alone would take minutes; the panic window reacts.
    r.run(120, |_, ready| waiting(80.0, ready));
    let panic_at = r.first(240, |d| d.panicking).expect("panics");
    assert!(panic_at <= 247, "panicked at {panic_at}");
    let (_, first) = &r.log.iter().find(|(t, _)| *t == panic_at).unwrap();
    assert!(first.desired >= 4, "{first:?}");
    assert!(first.reason.starts_with("panic: vllm:num_requests_waiting"), "{}", first.reason);
    assert!(first.reason.contains("over 60s vs target 4 (x2 threshold over 2 ready)"), "{}", first.reason);
    // Never down while panicking, and up to what 80 waiting needs (20) within the panic window.
    let panicking: Vec<u32> = r.log.iter().filter(|(_, d)| d.panicking).map(|(_, d)| d.desired).collect();
    assert!(panicking.windows(2).all(|w| w[1] >= w[0]), "{panicking:?}");
    assert!(r.first(240, |d| d.desired >= 20).is_some_and(|t| t <= 240 + 60), "{:?}", r.log.last());
    assert!(r.first(240, |d| d.desired > 20).is_none(), "no more than the load asks for");
    // The burst ends: panic holds for a stable window, then the delay holds, then down.
    r.run(180, |_, ready| waiting(4.0, ready));
    assert!(r.log.last().unwrap().1.desired >= 20);
    let d = r.run(900, |_, ready| waiting(4.0, ready));
    assert!(!d.panicking);
    assert_eq!(d.desired, 1, "{}", d.reason);
    let down = r.first(360, |d| d.desired < 20).unwrap();
    assert!(down >= 360 + 300, "scale-down at {down} did not wait for the delay");
}

#[test]
fn apa_noise_inside_tolerance_changes_nothing() {
    let mut r = Replay::new(spec(&format!("{{min: 1, max: 20, strategy: apa, metric: {WAITING4}}}")), 4);
    // 16 ± 7% waiting over 4 replicas: per replica 4 ± 0.28, inside the ±10% band.
    r.run(1800, |t, ready| waiting(16.0 * (1.0 + 0.07 * noise(t)), ready));
    assert!(r.log.iter().all(|(_, d)| d.desired == 4), "{:?}", r.log.iter().find(|(_, d)| d.desired != 4));
    let d = &r.log.last().unwrap().1;
    assert!(d.reason.contains("within tolerance (0.9–1.1 of target)"), "{}", d.reason);
    assert_eq!(d.metrics[0].name, "vllm:num_requests_waiting");
    assert!((d.metrics[0].value.unwrap() - 4.0).abs() < 0.3, "{:?}", d.metrics);
    // The same noise around a 30% higher load leaves the band: as the average passes 10%
    // over (17.6 waiting) it asks for 5, where 21 waiting is 4.2 per replica, inside again.
    let d = r.run(300, |t, ready| waiting(21.0 * (1.0 + 0.07 * noise(t)), ready));
    assert_eq!(d.desired, 5, "{}", d.reason);
    assert!(d.reason.contains("within tolerance"), "{}", d.reason);
}

#[test]
fn apa_rate_limits_each_decision() {
    let s = spec(&format!("{{min: 0, max: 100, strategy: apa, metric: {WAITING4}, stable_window: 1s, panic_window: 1s, scale_down_delay: 0}}"));
    let mut r = Replay::new(s, 2);
    // 200 waiting needs 50 replicas: 2 → 4 → 8 → 16 → 32 → 50, doubling at most.
    let ups: Vec<u32> = (0..6).map(|_| r.step(waiting(200.0, r.ready)).desired).collect();
    assert_eq!(ups, [4, 8, 16, 32, 50, 50]);
    assert!(r.log[0].1.reason.contains("wants 50, limited by max_scale_up_rate 2"), "{}", r.log[0].1.reason);
    // Down to 4 waiting (1 replica): halving at most: 50 → 25 → 12 → 6 → 3 → 1.
    let downs: Vec<u32> = (0..6).map(|_| r.step(waiting(4.0, r.ready)).desired).collect();
    assert_eq!(downs, [25, 12, 6, 3, 1, 1]);
    assert!(r.log[7].1.reason.contains("wants 1, limited by max_scale_down_rate 2"), "{}", r.log[7].1.reason);
}

#[test]
fn scale_down_waits_for_the_delay_of_continuous_lower_recommendations() {
    let s = spec(&format!("{{min: 1, max: 10, metric: {WAITING4}, stable_window: 10s, panic_window: 5s}}"));
    let mut r = Replay::new(s, 4);
    r.run(30, |_, ready| waiting(16.0, ready));
    r.run(100, |_, ready| waiting(4.0, ready));
    let lower = r.first(30, |d| d.reason.contains("waits for scale_down_delay")).expect("a lower recommendation");
    assert!(lower <= 40);
    assert!(r.log.iter().all(|(_, d)| d.desired == 4), "nothing before the delay");
    assert!(
        r.log.last().unwrap().1.reason.contains("scale-down to 1 waits for scale_down_delay ("),
        "{:?}",
        r.log.last()
    );
    // A load back at target for a moment restarts the wait: the delay needs a continuous run.
    r.run(15, |_, ready| waiting(16.0, ready));
    let restart = r.now_ms / 1000;
    r.run(200, |_, ready| waiting(4.0, ready));
    let lower = r.first(restart, |d| d.reason.contains("waits for scale_down_delay")).unwrap();
    assert!(r.first(restart, |d| d.desired < 4).is_none(), "{lower}");
    let d = r.run(120, |_, ready| waiting(4.0, ready));
    assert_eq!(d.desired, 1);
    let down = r.first(restart, |d| d.desired < 4).unwrap();
    assert_eq!(down, lower + 300, "down exactly when the lower recommendation has held for 300s");
}

#[test]
fn missing_metrics_never_scale_down() {
    let s = spec(&format!(
        "{{min: 1, max: 10, metric: {WAITING4}, stable_window: 30s, panic_window: 10s, scale_down_delay: 10s}}"
    ));
    let mut r = Replay::new(s, 3);
    // One replica's scrape fails: its waiting is unknown, not zero.
    let d = r.run(1200, |_, ready| {
        let mut t = waiting(0.0, ready);
        t.engine[2].waiting = None;
        t
    });
    assert_eq!(d.desired, 3, "{}", d.reason);
    assert!(d.reason.contains("vllm:num_requests_waiting unknown for 1 of 3 replicas"), "{}", d.reason);
    assert!(d.reason.starts_with("hold:"), "{}", d.reason);
    // A ready replica that is never recorded is unknown too.
    let d = r.run(120, |_, ready| {
        let mut t = waiting(0.0, ready);
        t.engine.pop();
        t
    });
    assert_eq!(d.desired, 3, "{}", d.reason);
    // Scale-up still works on what the known replicas report.
    let d = r.run(20, |_, ready| {
        let mut t = waiting(40.0, ready);
        t.engine[0].waiting = None;
        t
    });
    assert!(d.desired >= 5, "{}", d.reason);
    // With every scrape back, the model scales down after the delay.
    let d = r.run(200, |_, ready| waiting(0.0, ready));
    assert_eq!(d.desired, 1, "{}", d.reason);
}

#[test]
fn stale_gateway_reports_never_scale_down() {
    let s =
        spec("{min: 0, max: 10, metrics: [{source: gateway, name: concurrency, target: 4}], scale_down_delay: 10s}");
    let mut r = Replay::new(s, 2);
    r.run(60, |_, _| Tick { gateway: Some(gateway(8.0, 0.0, 4.0)), ..Tick::default() });
    let d = r.run(1200, |_, _| Tick::default());
    assert_eq!(d.desired, 2, "{}", d.reason);
    assert!(d.reason.contains("concurrency unknown (no fresh gateway report)"), "{}", d.reason);
}

#[test]
fn scale_to_zero_after_idle_and_delay_then_one_on_held_requests() {
    let s = spec("{min: 0, max: 10, metrics: [{source: gateway, name: concurrency, target: 4}]}");
    let mut r = Replay::new(s, 2);
    r.run(100, |_, _| Tick { gateway: Some(gateway(8.0, 0.0, 5.0)), ..Tick::default() });
    let idle_from = r.now_ms / 1000;
    let d = r.run(1000, |_, _| Tick { gateway: Some(gateway(0.0, 0.0, 0.0)), ..Tick::default() });
    assert_eq!(d.desired, 0, "{}", d.reason);
    let zero = r.first(idle_from, |d| d.desired == 0).unwrap();
    // The stable average empties after 180s, then 300s of zero recommendations.
    assert!(zero >= idle_from + 180 + 300 && zero <= idle_from + 180 + 300 + 5, "zero at {zero}");
    let one = r.first(idle_from, |d| d.desired == 1).unwrap();
    assert!(one >= idle_from + 300, "no scale-down before the delay: {one}");
    // A request arrives and is held at the gateway: one replica at once.
    let d = r.step(Tick { gateway: Some(gateway(0.0, 3.0, 3.0)), ..Tick::default() });
    assert_eq!(d.desired, 1);
    assert!(d.reason.starts_with("scale from zero: 3 requests held"), "{}", d.reason);
}

#[test]
fn busy_replicas_are_not_idle_even_when_the_metric_says_zero() {
    // Scaling on waiting: an empty queue asks for zero, but requests still run.
    let s = spec(&format!("{{min: 0, max: 10, metric: {WAITING4}, scale_down_delay: 0}}"));
    let mut r = Replay::new(s, 2);
    let busy = |_, ready: u32| {
        let mut t = waiting(0.0, ready);
        t.engine.iter_mut().for_each(|e| e.running = Some(3.0));
        t.gateway = Some(gateway(6.0, 0.0, 2.0));
        t
    };
    let d = r.run(600, busy);
    assert_eq!(d.desired, 1, "{}", d.reason);
    assert!(d.reason.contains("keeps 1 until requests stop for 60s"), "{}", d.reason);
}

// 2026-01-14 (Wed) 06:59 UTC = 07:59 in Berlin (CET); 2026-07-15 (Wed) 05:59 UTC = 07:59 CEST.
const WINTER_0759_BERLIN: i64 = 1_768_373_940_000;
const SUMMER_0759_BERLIN: i64 = 1_784_095_140_000;

#[test]
fn schedules_switch_bounds_at_local_time_in_any_season() {
    let s = spec(&format!(
        "{{min: 1, max: 10, metric: {WAITING4}, schedules: [
            {{days: [mon, tue, wed, thu, fri], start: '08:00', end: '18:00', time_zone: Europe/Berlin, min: 3}}]}}"
    ));
    for start in [WINTER_0759_BERLIN, SUMMER_0759_BERLIN] {
        let mut r = Replay::new(s.clone(), 1);
        r.wall_ms = start;
        let d = r.run(59, |_, ready| waiting(0.0, ready));
        assert_eq!((d.desired, d.bounds.schedule), (1, None), "07:59:59 local");
        let d = r.step(waiting(0.0, r.ready));
        assert_eq!((d.desired, d.bounds.min, d.bounds.schedule), (3, 3, Some(0)), "08:00 local: {}", d.reason);
        assert!(d.reason.contains("clamped to 3 by the schedule 0 bounds [3, 10]"), "{}", d.reason);
        // 18:00 local: the spec's bounds again; the extra replicas go after the delay.
        r.wall_ms = start + 60_000 + 10 * 3_600_000 - 1000;
        let d = r.run(300, |_, ready| waiting(0.0, ready));
        assert_eq!((d.desired, d.bounds.schedule), (3, None), "{}", d.reason);
        let d = r.run(2, |_, ready| waiting(0.0, ready));
        assert_eq!(d.desired, 1, "{}", d.reason);
    }
}

#[test]
fn a_schedule_max_below_current_applies_at_once() {
    let s = spec(&format!(
        "{{min: 0, max: 10, metric: {WAITING4}, schedules: [{{start: '08:00', end: '18:00', max: 2}}]}}"
    ));
    let mut r = Replay::new(s, 6);
    r.wall_ms = 1_768_377_540_000; // 2026-01-14 07:59 UTC
    r.run(59, |_, ready| waiting(24.0, ready));
    assert_eq!(r.current, 6);
    let d = r.step(waiting(24.0, r.ready));
    assert_eq!(d.desired, 2, "{}", d.reason);
    assert!(d.reason.contains("6 is over max 2 now"), "{}", d.reason);
}

#[test]
fn hpa_baseline_follows_the_newest_sample_without_delay() {
    let s = spec(&format!("{{min: 1, max: 20, strategy: hpa, metric: {WAITING4}}}"));
    let mut r = Replay::new(s, 4);
    let d = r.step(waiting(32.0, 4));
    assert_eq!(d.desired, 8, "ceil(4 × 8 / 4): {}", d.reason);
    assert_eq!(d.reason, "hpa: vllm:num_requests_waiting 8 per replica vs target 4, ceil(4 × 2) = 8");
    let d = r.step(waiting(8.0, r.ready));
    assert_eq!(d.desired, 2, "down at once, no delay: {}", d.reason);
    // No tolerance band: 5% over target adds a replica.
    let d = r.step(waiting(8.4, r.ready));
    assert_eq!(d.desired, 3);
    // A failed scrape: the last sample stands for `stale_after_ms`, then the replica is
    // unknown, and the known two (5.6, two replicas' worth) do not scale it down.
    r.run(20, |_, ready| {
        let mut t = waiting(8.4, ready);
        t.engine[1].waiting = None;
        t
    });
    assert!(r.log.iter().rev().take(20).all(|(_, d)| d.desired == 3), "{:?}", r.log.last());
    assert!(r.log.last().unwrap().1.reason.starts_with("hold: vllm:num_requests_waiting unknown for 1 of 3 replicas"));
}

#[test]
fn hpa_does_not_multiply_an_overload_again_while_replicas_start() {
    // 1 ready replica with 12 waiting (3× target) asks for 3. While the new ones start
    // (30 s) the same overload must not ask for ceil(3 × 3) = 9, then 27: a starting
    // replica counts as idle on the way up.
    let s = spec(&format!("{{min: 1, max: 40, strategy: hpa, metric: {WAITING4}}}"));
    let mut r = Replay::new(s, 1);
    r.startup_ms = 30_000;
    assert_eq!(r.step(waiting(12.0, r.ready)).desired, 3);
    let d = r.run(10, |_, ready| waiting(12.0, ready));
    assert_eq!((r.current, r.ready, d.desired), (3, 1, 3), "{}", d.reason);
    // Less load: one ready replica's worth asks for 2, but the starting ones are kept.
    let d = r.step(waiting(8.0, r.ready));
    assert_eq!(
        d.reason,
        "hpa: vllm:num_requests_waiting 8 per replica vs target 4, ceil(1 × 2), 3 kept (2 starting) = 3"
    );
    // Load gone: the starting ones count at target on the way down.
    let d = r.step(waiting(0.0, r.ready));
    assert_eq!(d.desired, 2, "{}", d.reason);
    assert!(d.reason.ends_with("ceil(1 × 0) + 2 starting = 2"), "{}", d.reason);
}

#[test]
fn helpers() {
    assert_eq!(ceil_replicas(8.000_000_000_1), 8);
    assert_eq!(ceil_replicas(8.01), 9);
    assert_eq!((ceil_replicas(0.0), ceil_replicas(-1.0), ceil_replicas(f64::NAN)), (0, 0, 0));
    assert_eq!(ceil_replicas(f64::INFINITY), u32::MAX);
    assert_eq!((num(38.0), num(3.25), num(0.8), num(2.0)), ("38".into(), "3.25".into(), "0.8".into(), "2".into()));
}
