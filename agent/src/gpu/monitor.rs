//! [`GpuMonitor`]: an inventory that remembers. It wraps the node's [`GpuInventory`],
//! classifies every probe's signals with each GPU's [`Track`] (recovery after clean probes,
//! the flap guard) and reports `GpuInfo` with the state and evidence; every state change is
//! logged. The agent's heartbeats probe through it.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use flotilla_api::spec::GpuHealthState;

use super::classify::{HealthPolicy, Track, Verdict};
use super::signals::GpuSignals;
use flotilla_api::civil::unix_ms;

use super::{GpuInfo, GpuInventory};

/// Most evidence lines one GPU reports.
pub const MAX_EVIDENCE: usize = 8;
/// Evidence lines are cut to this many bytes.
pub const MAX_EVIDENCE_LEN: usize = 256;

/// The node's GPUs, classified with history.
#[derive(Debug)]
pub struct GpuMonitor {
    inner: Arc<dyn GpuInventory>,
    policy: HealthPolicy,
    tracks: Mutex<BTreeMap<u32, Track>>,
}

fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_EVIDENCE_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// `gpu` with the verdict's state and evidence (`healthy` = not Failed; `health_reason`
/// = the evidence in one line, for older servers).
pub fn report(gpu: &GpuInfo, v: &Verdict) -> GpuInfo {
    let evidence: Vec<String> = v.evidence.iter().take(MAX_EVIDENCE).map(|e| cut(e)).collect();
    GpuInfo {
        healthy: v.state != GpuHealthState::Failed,
        state: v.state.as_str().to_string(),
        health_reason: if v.state == GpuHealthState::Healthy { String::new() } else { evidence.join("; ") },
        evidence,
        ..gpu.clone()
    }
}

impl GpuMonitor {
    /// Monitors `inner` with `policy`.
    pub fn new(inner: Arc<dyn GpuInventory>, policy: HealthPolicy) -> GpuMonitor {
        GpuMonitor { inner, policy, tracks: Mutex::new(BTreeMap::new()) }
    }

    /// One probe judged alone (no history).
    pub fn classify_once(gpus: &[GpuInfo], signals: &[GpuSignals]) -> Vec<GpuInfo> {
        let p = HealthPolicy::default();
        let now = unix_ms();
        gpus.iter()
            .map(|g| match signals.iter().find(|s| s.index == g.index) {
                Some(s) => report(g, &Track::default().step(s, now, &p)),
                None => g.clone(),
            })
            .collect()
    }
}

impl GpuInventory for GpuMonitor {
    fn gpus(&self) -> Vec<GpuInfo> {
        self.inner.gpus()
    }

    fn signals(&self) -> Vec<GpuSignals> {
        self.inner.signals()
    }

    fn usage(&self) -> Vec<super::GpuUsage> {
        self.inner.usage()
    }

    fn probe(&self) -> Vec<GpuInfo> {
        let gpus = self.inner.gpus();
        let signals = self.inner.signals();
        let now = unix_ms();
        let mut tracks = self.tracks.lock().unwrap_or_else(|p| p.into_inner());
        gpus.iter()
            .map(|g| {
                let Some(s) = signals.iter().find(|s| s.index == g.index) else { return g.clone() };
                let track = tracks.entry(g.index).or_default();
                let before = track.state;
                let v = track.step(s, now, &self.policy);
                if v.changed {
                    tracing::warn!(
                        gpu = g.index, from = %before, to = %v.state, evidence = ?v.evidence,
                        "GPU health changed"
                    );
                }
                report(g, &v)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{Fault, SimulatedGpus};

    #[test]
    fn the_monitor_keeps_history_and_recovers_after_three_clean_probes() {
        let sim = SimulatedGpus::new(2, "A100-80GB", 81920);
        let m = GpuMonitor::new(Arc::new(sim.clone()), HealthPolicy::default());
        sim.set_faults(vec![Fault::Xid { gpu: 1, code: 79 }]);
        let p = m.probe();
        assert_eq!((p[0].state.as_str(), p[1].state.as_str()), ("healthy", "failed"));
        assert!(!p[1].healthy && p[1].health_reason.starts_with("xid 79 (fallen off the bus) at "));
        sim.set_faults(vec![]);
        assert_eq!(m.probe()[1].state, "failed", "clean probe 1 of 3");
        assert_eq!(m.probe()[1].state, "failed", "clean probe 2 of 3");
        let p = m.probe();
        assert_eq!(p[1].state, "healthy");
        assert!(p[1].healthy && p[1].evidence.is_empty() && p[1].health_reason.is_empty());
        // The plain inventory has no memory: healthy at once.
        sim.set_faults(vec![Fault::Xid { gpu: 1, code: 79 }]);
        assert_eq!(sim.probe()[1].state, "failed");
        sim.set_faults(vec![]);
        assert_eq!(sim.probe()[1].state, "healthy");
    }

    #[test]
    fn reports_are_bounded() {
        let long = "x".repeat(1000);
        let v = Verdict { state: GpuHealthState::Failed, evidence: vec![long; 20], changed: true };
        let r = report(&GpuInfo::default(), &v);
        assert_eq!(r.evidence.len(), MAX_EVIDENCE);
        assert!(r.evidence.iter().all(|e| e.len() == MAX_EVIDENCE_LEN));
        assert!(!r.healthy);
    }
}
