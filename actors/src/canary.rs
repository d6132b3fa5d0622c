//! Canary rollouts: the leader's book of what the gateways saw per template (from their
//! demand reports, in memory only), and the pure analysis that moves a canary through its
//! steps, promotes it or rolls it back.
//!
//! ```text
//!  ReportDemand ─ revisions ─> CanaryBook ─ stats since the step began ─┐
//!  stored CanaryStatus ───────────────────────────────────────────────> advance ─> CanaryStatus
//! ```
//!
//! At each step the gateways send `steps[i]`% of the model's requests to the new template.
//! The new template is rolled back as soon as it has served `min_requests` in the step with
//! an error rate above `max_error_rate`; at the end of the step's `interval` it is rolled
//! back if its TTFT p95 exceeds `max_ttft_p95_ratio` times the old template's, and moves on
//! otherwise (a step with fewer than `min_requests` on the new template waits). The TTFT p95
//! over a step is the sample-weighted 95th percentile of the gateways' per-report p95s: an
//! upper estimate, the same for both sides, so their ratio stays fair. After a leader change
//! the book starts empty: the step's analysis waits for fresh reports.
use std::collections::{HashMap, VecDeque};

use flotilla_api::pb::RevisionDemand;
use flotilla_api::spec::CanarySpec;
use flotilla_api::ObjectName;
use serde::{Deserialize, Serialize};

/// Samples kept per model (about an hour of one gateway's reports per template pair).
pub const MAX_SAMPLES: usize = 8192;
/// Models tracked at once.
pub const MAX_MODELS: usize = 1024;
/// Samples older than this are dropped (a step lasts at most 24 h, but the analysis only
/// needs the current step; an hour bounds memory).
pub const SAMPLE_TTL_MS: u64 = 3_600_000;

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    at_ms: u64,
    hash: String,
    completed: u64,
    errors: u64,
    ttft_p95_ms: f64,
    ttft_samples: u64,
}

/// One side's numbers over a step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RevisionStats {
    pub requests: u64,
    pub errors: u64,
    /// 0 when nothing had a first token.
    pub ttft_p95_ms: f64,
}

impl RevisionStats {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// What the gateways reported per template, per model.
#[derive(Debug, Default)]
pub struct CanaryBook {
    by_model: HashMap<ObjectName, VecDeque<Sample>>,
}

impl CanaryBook {
    /// Adds one gateway report's per-template figures for `model`.
    pub fn record(&mut self, model: &ObjectName, revisions: &[RevisionDemand], at_ms: u64) {
        if revisions.is_empty() || (self.by_model.len() >= MAX_MODELS && !self.by_model.contains_key(model)) {
            return;
        }
        let q = self.by_model.entry(model.clone()).or_default();
        for r in revisions.iter().take(8) {
            if r.hash.len() > 16 {
                continue;
            }
            q.push_back(Sample {
                at_ms,
                hash: r.hash.clone(),
                completed: u64::from(r.completed),
                errors: u64::from(r.errors.min(r.completed)),
                ttft_p95_ms: if r.ttft_p95_ms.is_finite() { r.ttft_p95_ms.max(0.0) } else { 0.0 },
                ttft_samples: u64::from(r.ttft_samples),
            });
        }
        while q.len() > MAX_SAMPLES || q.front().is_some_and(|s| s.at_ms + SAMPLE_TTL_MS < at_ms) {
            q.pop_front();
        }
    }

    /// The figures of `model`'s template `hash` (or of every other template, `others`)
    /// reported at or after `since_ms`.
    pub fn stats(&self, model: &ObjectName, hash: &str, others: bool, since_ms: u64) -> RevisionStats {
        let Some(q) = self.by_model.get(model) else { return RevisionStats::default() };
        let picked: Vec<&Sample> = q.iter().filter(|s| s.at_ms >= since_ms && (s.hash == hash) != others).collect();
        let mut out = RevisionStats::default();
        for s in &picked {
            out.requests += s.completed;
            out.errors += s.errors;
        }
        let mut p95s: Vec<(f64, u64)> =
            picked.iter().filter(|s| s.ttft_samples > 0).map(|s| (s.ttft_p95_ms, s.ttft_samples)).collect();
        p95s.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total: u64 = p95s.iter().map(|p| p.1).sum();
        let mut seen = 0;
        for (v, n) in p95s {
            seen += n;
            if seen as f64 >= 0.95 * total as f64 {
                out.ttft_p95_ms = v;
                break;
            }
        }
        out
    }
}

/// A canary's progress, in the model status (`rollout.canary`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CanaryStatus {
    /// The template under test.
    pub hash: String,
    /// Index into `spec.rollout.canary.steps`.
    pub step: usize,
    /// Percent of requests the gateways send to it now.
    pub weight: u32,
    /// When the step began (unix ms).
    pub step_started_ms: u64,
    /// `Running`, `Promoted` (the old replicas are being replaced) or `RolledBack`.
    pub state: String,
    /// The last analysis, or why it was rolled back.
    pub reason: String,
}

impl CanaryStatus {
    pub fn running(&self) -> bool {
        self.state == "Running"
    }
    pub fn rolled_back(&self) -> bool {
        self.state == "RolledBack"
    }
}

/// What a step's analysis decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Wait(String),
    Advance(String),
    RollBack(String),
}

/// The analysis of one step (pure).
pub fn judge(spec: &CanarySpec, elapsed_ms: u64, canary: &RevisionStats, baseline: &RevisionStats) -> Verdict {
    let enough = canary.requests >= u64::from(spec.min_requests);
    if enough && canary.error_rate() > spec.max_error_rate {
        return Verdict::RollBack(format!(
            "error rate {:.3} ({} of {} requests) is above max_error_rate {}",
            canary.error_rate(),
            canary.errors,
            canary.requests,
            spec.max_error_rate
        ));
    }
    if elapsed_ms < spec.interval.as_millis() {
        let left = (spec.interval.as_millis() - elapsed_ms).div_ceil(1000);
        return Verdict::Wait(format!("{} requests so far, {left} s left in the step", canary.requests));
    }
    if !enough {
        return Verdict::Wait(format!(
            "{} of the {} requests the step needs (min_requests)",
            canary.requests, spec.min_requests
        ));
    }
    if baseline.ttft_p95_ms > 0.0 && canary.ttft_p95_ms > spec.max_ttft_p95_ratio * baseline.ttft_p95_ms {
        return Verdict::RollBack(format!(
            "TTFT p95 {:.0} ms is {:.2}x the old template's {:.0} ms (max_ttft_p95_ratio {})",
            canary.ttft_p95_ms,
            canary.ttft_p95_ms / baseline.ttft_p95_ms,
            baseline.ttft_p95_ms,
            spec.max_ttft_p95_ratio
        ));
    }
    Verdict::Advance(format!(
        "error rate {:.3}, TTFT p95 {:.0} ms vs {:.0} ms over {} requests",
        canary.error_rate(),
        canary.ttft_p95_ms,
        baseline.ttft_p95_ms,
        canary.requests
    ))
}

/// The canary's next status: a new one for a template not seen before, the stored one
/// moved on by the analysis otherwise. `stats`: (new template, the others) since the
/// stored step began.
pub fn advance(
    spec: &CanarySpec,
    stored: Option<&CanaryStatus>,
    hash: &str,
    now_ms: u64,
    stats: (RevisionStats, RevisionStats),
) -> CanaryStatus {
    let first = || CanaryStatus {
        hash: hash.to_owned(),
        step: 0,
        weight: spec.steps[0],
        step_started_ms: now_ms,
        state: "Running".into(),
        reason: "step 1 began".into(),
    };
    let Some(cur) = stored.filter(|c| c.hash == hash) else { return first() };
    if !cur.running() {
        return cur.clone();
    }
    // A spec edited mid-canary may have fewer steps: clamp to the last one.
    let step = cur.step.min(spec.steps.len() - 1);
    let elapsed = now_ms.saturating_sub(cur.step_started_ms);
    match judge(spec, elapsed, &stats.0, &stats.1) {
        Verdict::Wait(why) => CanaryStatus { step, weight: spec.steps[step], reason: why, ..cur.clone() },
        Verdict::RollBack(why) => CanaryStatus { weight: 0, state: "RolledBack".into(), reason: why, ..cur.clone() },
        Verdict::Advance(why) if step + 1 >= spec.steps.len() => {
            CanaryStatus { step, weight: 100, state: "Promoted".into(), reason: why, ..cur.clone() }
        }
        Verdict::Advance(why) => CanaryStatus {
            step: step + 1,
            weight: spec.steps[step + 1],
            step_started_ms: now_ms,
            reason: format!("step {} passed: {why}", step + 1),
            ..cur.clone()
        },
    }
}

/// Replicas of the new template a running canary at `weight`% of `desired` wants.
pub fn canary_replicas(desired: usize, weight: u32) -> usize {
    (desired * weight as usize).div_ceil(100).clamp(1, desired.max(1))
}

#[cfg(test)]
mod tests {
    use flotilla_api::spec::SpecDuration;

    use super::*;

    fn spec() -> CanarySpec {
        CanarySpec { steps: vec![10, 50, 100], interval: SpecDuration::from_secs(60), ..CanarySpec::default() }
    }

    fn stats(requests: u64, errors: u64, ttft: f64) -> RevisionStats {
        RevisionStats { requests, errors, ttft_p95_ms: ttft }
    }

    #[test]
    fn errors_roll_back_at_once_and_latency_at_the_end_of_the_step() {
        let s = spec();
        let ok = stats(100, 0, 100.0);
        assert!(
            matches!(judge(&s, 1_000, &stats(30, 3, 100.0), &ok), Verdict::RollBack(w) if w.contains("error rate 0.100"))
        );
        assert!(matches!(judge(&s, 1_000, &stats(10, 3, 100.0), &ok), Verdict::Wait(_)), "too few requests to judge");
        assert!(matches!(judge(&s, 1_000, &stats(30, 0, 500.0), &ok), Verdict::Wait(w) if w.contains("59 s left")));
        let slow = judge(&s, 60_000, &stats(30, 0, 130.0), &ok);
        assert!(matches!(&slow, Verdict::RollBack(w) if w.contains("1.30x")), "{slow:?}");
        assert!(matches!(judge(&s, 60_000, &stats(30, 0, 110.0), &ok), Verdict::Advance(_)));
        assert!(matches!(judge(&s, 60_000, &stats(5, 0, 110.0), &ok), Verdict::Wait(w) if w.contains("min_requests")));
        assert!(
            matches!(judge(&s, 60_000, &stats(30, 0, 900.0), &stats(0, 0, 0.0)), Verdict::Advance(_)),
            "no baseline"
        );
    }

    #[test]
    fn a_canary_walks_its_steps_then_is_promoted() {
        let s = spec();
        let good = (stats(50, 0, 100.0), stats(500, 0, 100.0));
        let c = advance(&s, None, "abc", 1_000, good);
        assert_eq!((c.step, c.weight, c.state.as_str()), (0, 10, "Running"));
        let c2 = advance(&s, Some(&c), "abc", 30_000, good);
        assert_eq!((c2.step, c2.step_started_ms), (0, 1_000), "mid-step: waits");
        let c3 = advance(&s, Some(&c2), "abc", 61_000, good);
        assert_eq!((c3.step, c3.weight, c3.step_started_ms), (1, 50, 61_000));
        let c4 = advance(&s, Some(&c3), "abc", 121_000, good);
        let c5 = advance(&s, Some(&c4), "abc", 181_000, good);
        assert_eq!((c5.weight, c5.state.as_str()), (100, "Promoted"));
        assert_eq!(advance(&s, Some(&c5), "abc", 999_000, good), c5, "final states stay");
        let other = advance(&s, Some(&c5), "def", 999_000, good);
        assert_eq!(
            (other.hash.as_str(), other.step, other.state.as_str()),
            ("def", 0, "Running"),
            "a new template starts over"
        );
        let bad = advance(&s, Some(&c3), "abc", 70_000, (stats(50, 10, 100.0), stats(500, 0, 100.0)));
        assert_eq!((bad.state.as_str(), bad.weight), ("RolledBack", 0));
        assert!(bad.reason.contains("error rate"), "{}", bad.reason);
    }

    #[test]
    fn the_book_sums_per_template_since_a_time_and_weights_percentiles() {
        let mut b = CanaryBook::default();
        let m: ObjectName = "m".parse().unwrap();
        let rd = |hash: &str, completed, errors, p95, n| RevisionDemand {
            hash: hash.into(),
            completed,
            errors,
            ttft_p95_ms: p95,
            ttft_samples: n,
        };
        b.record(&m, &[rd("new", 10, 1, 100.0, 30), rd("old", 90, 0, 50.0, 90)], 1_000);
        b.record(&m, &[rd("new", 10, 0, 300.0, 1), rd("old", 90, 0, 60.0, 90)], 2_000);
        assert_eq!(b.stats(&m, "new", false, 0), RevisionStats { requests: 20, errors: 1, ttft_p95_ms: 100.0 });
        assert_eq!(b.stats(&m, "new", true, 0).requests, 180, "every other template");
        assert_eq!(b.stats(&m, "new", false, 1_500).requests, 10, "since the step began");
        assert_eq!(b.stats(&"x".parse().unwrap(), "new", false, 0), RevisionStats::default());
        b.record(&m, &[rd("new", 1, 0, 1.0, 1)], 2_000 + SAMPLE_TTL_MS + 1);
        assert_eq!(b.stats(&m, "new", false, 0).requests, 1, "old samples age out");
    }

    #[test]
    fn canary_replicas_follow_the_weight() {
        assert_eq!(canary_replicas(4, 10), 1);
        assert_eq!(canary_replicas(4, 50), 2);
        assert_eq!(canary_replicas(4, 100), 4);
        assert_eq!(canary_replicas(10, 25), 3);
        assert_eq!(canary_replicas(0, 50), 1);
    }
}
