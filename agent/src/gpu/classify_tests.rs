use flotilla_api::spec::GpuHealthState::{self, Degraded, Failed, Healthy};

use super::*;
use crate::gpu::signals::{PcieLink, Throttle, XidEvent};

/// 20:31:07 UTC on some day, in ms.
const T: u64 = 20_000 * 86_400_000 + (20 * 3600 + 31 * 60 + 7) * 1000;

fn one(s: &GpuSignals) -> Verdict {
    Track::default().step(s, T, &HealthPolicy::default())
}

fn sig(f: impl FnOnce(&mut GpuSignals)) -> GpuSignals {
    let mut s = GpuSignals::clean(1);
    f(&mut s);
    s
}

#[test]
fn clock_is_utc_time_of_day() {
    assert_eq!(clock(T), "20:31:07");
    assert_eq!(clock(0), "00:00:00");
}

#[test]
fn each_fault_class_gives_its_state_and_evidence() {
    let xid = |code| move |s: &mut GpuSignals| s.xids = vec![XidEvent { code, at_ms: T }];
    let cases: Vec<(&str, GpuSignals, GpuHealthState, &str)> = vec![
        ("clean", GpuSignals::clean(1), Healthy, ""),
        ("xid 79", sig(xid(79)), Failed, "xid 79 (fallen off the bus) at 20:31:07"),
        ("xid 48", sig(xid(48)), Failed, "xid 48 (double-bit ECC error) at 20:31:07"),
        ("xid 94", sig(xid(94)), Failed, "xid 94 (contained ECC error)"),
        ("xid 13", sig(xid(13)), Healthy, "xid 13 (graphics engine exception) at 20:31:07 (informational)"),
        ("xid unknown", sig(xid(7777)), Healthy, "xid 7777 at 20:31:07 (informational)"),
        ("unreachable", sig(|s| s.unreachable = Some("GPU is lost".into())), Failed, "unreachable: GPU is lost"),
        (
            "missing",
            sig(|s| {
                s.missing = true;
                s.visible = Some((3, 4));
            }),
            Failed,
            "not visible (3 of 4 GPUs visible)",
        ),
        (
            "ecc uncorrected",
            sig(|s| s.ecc_volatile_uncorrected = 5),
            Failed,
            "5 uncorrected ECC errors since the driver loaded",
        ),
        ("remap failed", sig(|s| s.remap_failed = true), Failed, "row remapping failed (no spare rows)"),
        ("retired pages", sig(|s| s.retired_pages = 61), Failed, "61 retired pages, over 60"),
        ("injected", sig(|s| s.injected = Some("xid 79".into())), Failed, "xid 79"),
        ("thermal", sig(|s| s.throttle = vec![Throttle::Thermal]), Degraded, "thermal throttling"),
        ("power", sig(|s| s.throttle = vec![Throttle::Power]), Degraded, "power throttling"),
        (
            "pcie",
            sig(|s| s.pcie = Some(PcieLink { gen: 3, width: 8, max_gen: 4, max_width: 16 })),
            Degraded,
            "pcie link gen 3 x8, below gen 4 x16",
        ),
        ("pcie at max", sig(|s| s.pcie = Some(PcieLink { gen: 4, width: 16, max_gen: 4, max_width: 16 })), Healthy, ""),
        ("retirement pending", sig(|s| s.retirement_pending = true), Degraded, "page retirement pending"),
        ("remap pending", sig(|s| s.remap_pending = true), Degraded, "row remapping pending"),
        (
            "worst wins, all evidence kept",
            sig(|s| {
                s.throttle = vec![Throttle::Thermal];
                s.xids = vec![XidEvent { code: 79, at_ms: T }];
            }),
            Failed,
            "thermal throttling",
        ),
    ];
    for (what, s, want, evidence) in cases {
        let v = one(&s);
        assert_eq!(v.state, want, "{what}: {v:?}");
        if evidence.is_empty() {
            assert!(v.evidence.is_empty(), "{what}: {v:?}");
        } else {
            assert!(v.evidence.iter().any(|e| e.contains(evidence)), "{what}: {v:?}");
        }
        assert_eq!(v.changed, want != Healthy, "{what}");
    }
}

#[test]
fn worst_evidence_comes_first() {
    let v = one(&sig(|s| {
        s.throttle = vec![Throttle::Power];
        s.ecc_volatile_uncorrected = 1;
    }));
    assert_eq!(v.evidence[0], "1 uncorrected ECC errors since the driver loaded");
    assert_eq!(v.evidence[1], "power throttling");
}

#[test]
fn aggregate_ecc_rising_fails_and_a_steady_old_count_does_not() {
    let p = HealthPolicy::default();
    let mut t = Track::default();
    let agg = |n| sig(|s| s.ecc_aggregate_uncorrected = n);
    assert_eq!(t.step(&agg(4), T, &p).state, Healthy, "old errors from before the agent started");
    assert_eq!(t.step(&agg(4), T + 1000, &p).state, Healthy);
    let v = t.step(&agg(6), T + 2000, &p);
    assert_eq!(v.state, Failed);
    assert_eq!(v.evidence, vec!["uncorrected ECC errors (aggregate) rose from 4 to 6"]);
}

#[test]
fn correctable_ecc_trend_degrades() {
    let p = HealthPolicy { ecc_corrected_trend: 100, ecc_trend_probes: 5, ..Default::default() };
    let mut t = Track::default();
    let c = |n| sig(|s| s.ecc_volatile_corrected = n);
    // A slow trickle: 10 per probe never reaches 100 within 5 probes.
    for i in 0..20 {
        assert_eq!(t.step(&c(1000 + i * 10), T + i * 1000, &p).state, Healthy, "probe {i}");
    }
    let mut t = Track::default();
    assert_eq!(t.step(&c(0), T, &p).state, Healthy);
    assert_eq!(t.step(&c(60), T + 1000, &p).state, Healthy);
    let v = t.step(&c(120), T + 2000, &p);
    assert_eq!(v.state, Degraded);
    assert_eq!(v.evidence, vec!["correctable ECC errors rising (100 or more within 5 probes)"]);
}

#[test]
fn recovery_takes_n_clean_probes() {
    let p = HealthPolicy::default();
    let mut t = Track::default();
    let bad = sig(|s| s.xids = vec![XidEvent { code: 79, at_ms: T }]);
    let clean = GpuSignals::clean(1);
    let v = t.step(&bad, T, &p);
    assert!(v.changed && v.state == Failed);
    assert_eq!(t.since_ms, T);
    for i in 1..3 {
        let v = t.step(&clean, T + i * 1000, &p);
        assert_eq!(v.state, Failed, "clean probe {i} of 3");
        assert_eq!(v.evidence, vec!["xid 79 (fallen off the bus) at 20:31:07"], "the evidence stays while recovering");
        assert!(!v.changed);
    }
    let v = t.step(&clean, T + 3000, &p);
    assert_eq!(v.state, Healthy);
    assert!(v.changed && v.evidence.is_empty());
    assert_eq!(t.since_ms, T + 3000);
}

#[test]
fn a_bad_probe_during_recovery_starts_the_count_again() {
    let p = HealthPolicy::default();
    let mut t = Track::default();
    let hot = sig(|s| s.throttle = vec![Throttle::Thermal]);
    let clean = GpuSignals::clean(1);
    assert_eq!(t.step(&hot, T, &p).state, Degraded);
    assert_eq!(t.step(&clean, T + 1, &p).state, Degraded);
    assert_eq!(t.step(&clean, T + 2, &p).state, Degraded);
    assert_eq!(t.step(&hot, T + 3, &p).state, Degraded);
    assert_eq!(t.step(&clean, T + 4, &p).state, Degraded);
    assert_eq!(t.step(&clean, T + 5, &p).state, Degraded);
    assert_eq!(t.step(&clean, T + 6, &p).state, Healthy);
}

#[test]
fn failed_steps_down_to_degraded_when_only_a_soft_signal_remains() {
    let p = HealthPolicy::default();
    let mut t = Track::default();
    let both = sig(|s| {
        s.ecc_volatile_uncorrected = 2;
        s.throttle = vec![Throttle::Thermal];
    });
    let soft = sig(|s| s.throttle = vec![Throttle::Thermal]);
    assert_eq!(t.step(&both, T, &p).state, Failed);
    assert_eq!(t.step(&soft, T + 1, &p).state, Failed);
    assert_eq!(t.step(&soft, T + 2, &p).state, Failed);
    let v = t.step(&soft, T + 3, &p);
    assert_eq!((v.state, v.evidence), (Degraded, vec!["thermal throttling".to_string()]));
}

#[test]
fn a_flapping_gpu_stays_degraded_and_soft_flaps_never_fail_it() {
    let p = HealthPolicy { recover_probes: 1, ..Default::default() };
    let mut t = Track::default();
    let hot = sig(|s| s.throttle = vec![Throttle::Thermal]);
    let clean = GpuSignals::clean(1);
    let mut states = Vec::new();
    for i in 0..10u64 {
        let s = if i % 2 == 0 { &hot } else { &clean };
        states.push(t.step(s, T + i * 1000, &p).state);
    }
    assert!(states.iter().all(|s| *s != Failed), "a soft signal never fails a GPU: {states:?}");
    // H→D, D→H, H→D (3 changes); the 4th (back to Healthy) is refused.
    assert_eq!(
        states,
        vec![Degraded, Healthy, Degraded, Degraded, Degraded, Degraded, Degraded, Degraded, Degraded, Degraded]
    );
    assert!(t.evidence.iter().any(|e| e.starts_with("flapping: 3 state changes within 600 s")), "{:?}", t.evidence);
    // Once the window has passed, clean probes bring it back.
    let v = t.step(&clean, T + 700_000, &p);
    assert_eq!(v.state, Healthy, "{v:?}");
}

#[test]
fn a_hard_fault_still_fails_a_flapping_gpu() {
    let p = HealthPolicy { recover_probes: 1, flap_max_changes: 1, ..Default::default() };
    let mut t = Track::default();
    let hot = sig(|s| s.throttle = vec![Throttle::Thermal]);
    assert_eq!(t.step(&hot, T, &p).state, Degraded);
    assert_eq!(t.step(&GpuSignals::clean(1), T + 1, &p).state, Degraded, "guarded");
    let v = t.step(&sig(|s| s.remap_failed = true), T + 2, &p);
    assert_eq!(v.state, Failed);
}
