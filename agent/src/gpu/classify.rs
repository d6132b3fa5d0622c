//! The GPU health classifier (pure): one probe's [`GpuSignals`] and the GPU's history
//! ([`Track`]) → Healthy / Degraded / Failed with human-readable evidence.
//!
//! ```text
//!  signals ──findings()──> [(Failed|Degraded, "xid 79 (fallen off the bus) at 20:31:07"), ...]
//!                               │ worst
//!  Track { state, better streak, recent changes } ──step()──> Verdict { state, evidence }
//! ```
//!
//! Defaults ([`HealthPolicy::default`]):
//! - **Failed**: a critical XID ([`CRITICAL_XIDS`](super::signals::CRITICAL_XIDS)) within the
//!   source's event window, fallen off the bus / unreachable, not visible (fewer GPUs than
//!   registered), uncorrected ECC errors (volatile, or the aggregate rising), a failed row
//!   remap, more than 60 retired pages, an injected failure.
//! - **Degraded**: thermal or power throttling, a PCIe link below its maximum generation
//!   or width, correctable ECC errors rising by 100 or more within 60 probes, a page
//!   retirement or row remap waiting for a reset.
//! - Informational XIDs are evidence only.
//! - A worse state is taken at once; a better one only after `recover_probes` (3)
//!   consecutive probes that are all better than the current state.
//! - Flap guard: a GPU whose state changed more than `flap_max_changes` (3) times within
//!   `flap_window_ms` (10 min) does not return to Healthy: it stays Degraded until the
//!   window holds fewer changes. Soft signals never make a GPU Failed, however they flap.
use std::collections::VecDeque;

use flotilla_api::spec::GpuHealthState;

use super::signals::{xid_is_critical, xid_name, GpuSignals};

/// Thresholds of the classifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive better probes before a GPU's state improves.
    pub recover_probes: u32,
    /// More state changes than this within the window keep a GPU off Healthy.
    pub flap_max_changes: usize,
    /// The flap guard's window, ms.
    pub flap_window_ms: u64,
    /// Correctable ECC errors rising by this much within `ecc_trend_probes` → Degraded.
    pub ecc_corrected_trend: u64,
    /// Probes the correctable ECC trend looks back.
    pub ecc_trend_probes: usize,
    /// More retired pages than this → Failed.
    pub max_retired_pages: u64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            recover_probes: 3,
            flap_max_changes: 3,
            flap_window_ms: 600_000,
            ecc_corrected_trend: 100,
            ecc_trend_probes: 60,
            max_retired_pages: 60,
        }
    }
}

/// One thing a probe found, and the state it calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub state: GpuHealthState,
    pub evidence: String,
}

/// What the classifier remembers of one GPU between probes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Track {
    pub state: GpuHealthState,
    /// Wall-clock ms of the last state change (0: never changed).
    pub since_ms: u64,
    /// Evidence of the current state.
    pub evidence: Vec<String>,
    /// Consecutive probes better than `state`.
    better: u32,
    /// When the state changed, within the flap window.
    changes: VecDeque<u64>,
    /// Recent correctable ECC counts, newest last.
    corrected: VecDeque<u64>,
    /// The aggregate uncorrected ECC count at the first probe.
    aggregate_base: Option<u64>,
}

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub state: GpuHealthState,
    pub evidence: Vec<String>,
    /// The state differs from the previous probe's.
    pub changed: bool,
}

/// `HH:MM:SS` (UTC) of a Unix ms timestamp.
pub fn clock(ms: u64) -> String {
    let s = (ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

fn xid_text(code: u64, at_ms: u64) -> String {
    match xid_name(code) {
        "" => format!("xid {code} at {}", clock(at_ms)),
        name => format!("xid {code} ({name}) at {}", clock(at_ms)),
    }
}

impl Track {
    /// What this probe found, worst first (reads and updates the ECC history).
    pub fn findings(&mut self, s: &GpuSignals, p: &HealthPolicy) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut add = |state, evidence: String| out.push(Finding { state, evidence });
        use GpuHealthState::{Degraded, Failed, Healthy};
        if let Some(why) = &s.injected {
            add(Failed, why.clone());
        }
        if s.missing {
            match s.visible {
                Some((v, r)) => add(Failed, format!("not visible ({v} of {r} GPUs visible)")),
                None => add(Failed, "not visible".into()),
            }
        }
        if let Some(why) = &s.unreachable {
            add(Failed, format!("unreachable: {why}"));
        }
        for x in &s.xids {
            let state = if xid_is_critical(x.code) { Failed } else { Healthy };
            let suffix = if state == Healthy { " (informational)" } else { "" };
            add(state, format!("{}{suffix}", xid_text(x.code, x.at_ms)));
        }
        if s.ecc_volatile_uncorrected > 0 {
            add(Failed, format!("{} uncorrected ECC errors since the driver loaded", s.ecc_volatile_uncorrected));
        }
        let base = *self.aggregate_base.get_or_insert(s.ecc_aggregate_uncorrected);
        if s.ecc_volatile_uncorrected == 0 && s.ecc_aggregate_uncorrected > base {
            add(
                Failed,
                format!("uncorrected ECC errors (aggregate) rose from {base} to {}", s.ecc_aggregate_uncorrected),
            );
        }
        if s.remap_failed {
            add(Failed, "row remapping failed (no spare rows)".into());
        }
        if s.retired_pages > p.max_retired_pages {
            add(Failed, format!("{} retired pages, over {}", s.retired_pages, p.max_retired_pages));
        }
        for t in &s.throttle {
            add(Degraded, format!("{} throttling", t.as_str()));
        }
        if let Some(l) = s.pcie.filter(|l| l.downgraded()) {
            add(Degraded, format!("pcie link gen {} x{}, below gen {} x{}", l.gen, l.width, l.max_gen, l.max_width));
        }
        self.corrected.push_back(s.ecc_volatile_corrected);
        while self.corrected.len() > p.ecc_trend_probes.max(1) + 1 {
            self.corrected.pop_front();
        }
        let rise = s.ecc_volatile_corrected.saturating_sub(*self.corrected.front().unwrap_or(&0));
        if p.ecc_corrected_trend > 0 && rise >= p.ecc_corrected_trend {
            add(
                Degraded,
                format!(
                    "correctable ECC errors rising ({} or more within {} probes)",
                    p.ecc_corrected_trend, p.ecc_trend_probes
                ),
            );
        }
        if s.retirement_pending {
            add(Degraded, "page retirement pending (needs a GPU reset)".into());
        }
        if s.remap_pending {
            add(Degraded, "row remapping pending (needs a GPU reset)".into());
        }
        out.sort_by_key(|f| std::cmp::Reverse(f.state));
        out
    }

    /// Classifies one probe taken at `now_ms` (wall clock) and moves the track on.
    pub fn step(&mut self, s: &GpuSignals, now_ms: u64, p: &HealthPolicy) -> Verdict {
        let found = self.findings(s, p);
        let worst = found.first().map_or(GpuHealthState::Healthy, |f| f.state);
        let evidence: Vec<String> = found.into_iter().map(|f| f.evidence).collect();
        while self.changes.front().is_some_and(|t| now_ms.saturating_sub(*t) > p.flap_window_ms) {
            self.changes.pop_front();
        }
        let (mut target, mut why) = if worst >= self.state {
            self.better = 0;
            (worst, evidence)
        } else {
            self.better += 1;
            if self.better >= p.recover_probes {
                self.better = 0;
                (worst, evidence)
            } else {
                // Still recovering: the state and its evidence stay.
                (self.state, self.evidence.clone())
            }
        };
        // The change back to Healthy would be one more than the guard allows.
        if target == GpuHealthState::Healthy
            && self.state != GpuHealthState::Healthy
            && self.changes.len() >= p.flap_max_changes
        {
            target = GpuHealthState::Degraded;
            why.push(format!("flapping: {} state changes within {} s", self.changes.len(), p.flap_window_ms / 1000));
        }
        let changed = target != self.state;
        if changed {
            self.changes.push_back(now_ms);
            self.since_ms = now_ms;
            self.state = target;
        }
        self.evidence = why.clone();
        Verdict { state: target, evidence: why, changed }
    }
}

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;
