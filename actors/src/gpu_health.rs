//! Per-GPU health as the leader records it (pure): the agents classify their GPUs
//! (Healthy / Degraded / Failed with evidence, `GpuInfo.state` and `.evidence`); the leader
//! keeps the latest report of each node in memory and the node actor writes it into
//! `NodeStatus.gpu_health` (non-Healthy GPUs only, `since_ms` kept while the state stays)
//! and `unhealthy_gpus` (the Failed ones). Degraded and Failed GPUs take no new replicas
//! (`NodeStatus::free_gpus`); replicas on Failed GPUs are replaced make-before-break by
//! their model (`facts::BoundNodes::failed_gpus`).
//!
//! ```text
//!  heartbeat GpuInfo[] ──reports()──> NodeLive.gpu_reports ──record()──> NodeStatus.gpu_health
//!                                                            changes() ──> log + metric
//! ```
use std::collections::BTreeMap;

use flotilla_api::pb::GpuInfo;
use flotilla_api::spec::{GpuHealth, GpuHealthState};

/// One GPU's latest report (not Healthy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuReport {
    pub state: GpuHealthState,
    pub evidence: Vec<String>,
}

/// The reported state of `g` (an unknown word, refused by the bounds check, reads as the
/// `healthy` flag says).
pub fn state_of(g: &GpuInfo) -> GpuHealthState {
    GpuHealthState::from_report(&g.state, g.healthy).unwrap_or(if g.healthy {
        GpuHealthState::Healthy
    } else {
        GpuHealthState::Failed
    })
}

/// The GPUs of a report that are not Healthy. An older agent (no state word) reports
/// `healthy: false` with a reason: Failed with that reason as evidence.
pub fn reports(gpus: &[GpuInfo]) -> BTreeMap<u32, GpuReport> {
    gpus.iter()
        .filter_map(|g| {
            let state = state_of(g);
            if state == GpuHealthState::Healthy {
                return None;
            }
            let evidence = if g.evidence.is_empty() && !g.health_reason.is_empty() {
                vec![g.health_reason.clone()]
            } else {
                g.evidence.clone()
            };
            Some((g.index, GpuReport { state, evidence }))
        })
        .collect()
}

/// The Failed GPUs of a report.
pub fn failed(reports: &BTreeMap<u32, GpuReport>) -> Vec<u32> {
    reports.iter().filter(|(_, r)| r.state == GpuHealthState::Failed).map(|(i, _)| *i).collect()
}

/// The `gpu_health` a node's status should hold after `reported`: each GPU's `since_ms`
/// stays while its state does, and is `wall_ms` when it changes.
pub fn record(
    current: &BTreeMap<u32, GpuHealth>,
    reported: &BTreeMap<u32, GpuReport>,
    wall_ms: u64,
) -> BTreeMap<u32, GpuHealth> {
    reported
        .iter()
        .map(|(i, r)| {
            let since_ms = match current.get(i) {
                Some(h) if h.state == r.state => h.since_ms,
                _ => wall_ms,
            };
            (*i, GpuHealth { state: r.state, evidence: r.evidence.clone(), since_ms })
        })
        .collect()
}

/// A GPU whose state changed between two `gpu_health` maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub gpu: u32,
    pub from: GpuHealthState,
    pub to: GpuHealthState,
    pub evidence: Vec<String>,
}

/// Every state change from `before` to `after` (a GPU missing from a map is Healthy).
pub fn changes(before: &BTreeMap<u32, GpuHealth>, after: &BTreeMap<u32, GpuHealth>) -> Vec<Change> {
    let state = |m: &BTreeMap<u32, GpuHealth>, i: &u32| m.get(i).map_or(GpuHealthState::Healthy, |h| h.state);
    let mut gpus: Vec<u32> = before.keys().chain(after.keys()).copied().collect();
    gpus.sort_unstable();
    gpus.dedup();
    gpus.into_iter()
        .filter_map(|i| {
            let (from, to) = (state(before, &i), state(after, &i));
            (from != to).then(|| Change {
                gpu: i,
                from,
                to,
                evidence: after.get(&i).map(|h| h.evidence.clone()).unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "gpu_health_tests.rs"]
mod scenario;

#[cfg(test)]
mod tests {
    use super::*;
    use GpuHealthState::{Degraded, Failed, Healthy};

    fn gpu(index: u32, state: &str, healthy: bool, evidence: &[&str], reason: &str) -> GpuInfo {
        GpuInfo {
            index,
            state: state.into(),
            healthy,
            evidence: evidence.iter().map(|s| s.to_string()).collect(),
            health_reason: reason.into(),
            ..Default::default()
        }
    }

    #[test]
    fn reports_keep_the_unhealthy_and_read_older_agents() {
        let r = reports(&[
            gpu(0, "healthy", true, &[], ""),
            gpu(1, "failed", false, &["xid 79 (fallen off the bus) at 20:31:07"], "x"),
            gpu(2, "degraded", true, &["thermal throttling"], ""),
            gpu(3, "", false, &[], "3 uncorrected ECC errors"),
            gpu(4, "", true, &[], ""),
        ]);
        assert_eq!(r.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(
            r[&1],
            GpuReport { state: Failed, evidence: vec!["xid 79 (fallen off the bus) at 20:31:07".into()] }
        );
        assert_eq!(r[&2].state, Degraded);
        assert_eq!(r[&3], GpuReport { state: Failed, evidence: vec!["3 uncorrected ECC errors".into()] });
        assert_eq!(failed(&r), vec![1, 3]);
    }

    #[test]
    fn since_stays_while_the_state_does_and_changes_are_listed() {
        let rep = |s, e: &str| GpuReport { state: s, evidence: vec![e.to_string()] };
        let first = record(&BTreeMap::new(), &BTreeMap::from([(1, rep(Degraded, "thermal throttling"))]), 100);
        assert_eq!(first[&1].since_ms, 100);
        let same = record(&first, &BTreeMap::from([(1, rep(Degraded, "power throttling"))]), 200);
        assert_eq!((same[&1].since_ms, same[&1].evidence[0].as_str()), (100, "power throttling"));
        let worse = record(&same, &BTreeMap::from([(1, rep(Failed, "xid 79"))]), 300);
        assert_eq!(worse[&1].since_ms, 300);
        assert_eq!(
            changes(&same, &worse),
            vec![Change { gpu: 1, from: Degraded, to: Failed, evidence: vec!["xid 79".into()] }]
        );
        let healed = record(&worse, &BTreeMap::new(), 400);
        assert!(healed.is_empty());
        assert_eq!(changes(&worse, &healed), vec![Change { gpu: 1, from: Failed, to: Healthy, evidence: vec![] }]);
        assert!(changes(&first, &same).is_empty(), "evidence alone is no state change");
    }
}
