//! The autoscaler's status write, pure: whether an evaluation writes the model's
//! `status.autoscaling` (each write is a Raft entry), and what it writes. It writes when
//! the desired count changed or none was written yet, and refreshes the metrics shown when
//! they moved, at most every [`DISPLAY_REFRESH_MS`]; a change of the count adds a history
//! entry, the history keeping the last [`SCALING_HISTORY`] changes.
//!
//! ```text
//!  stored status, current, Decision, last write, now ──should_write──> write? ──next_status──> status
//! ```
use super::Decision;
use crate::objects::{AutoscalingStatus, MetricStatus, ScalingEvent, SCALING_HISTORY};

/// The metrics shown in the status are refreshed at most this often when the desired
/// count does not change.
pub const DISPLAY_REFRESH_MS: u64 = 15_000;

/// The decision's metrics as the status shows them.
pub fn metric_statuses(decision: &Decision) -> Vec<MetricStatus> {
    decision.metrics.iter().map(|m| MetricStatus { name: m.name.clone(), value: m.value, target: m.target }).collect()
}

/// Whether to write the status: the desired count moved away from `current` (or no
/// autoscaling status is stored), or the shown metrics or reason moved and the last write
/// (`last_written_ms`, monotonic, by this autoscaler) is [`DISPLAY_REFRESH_MS`] old.
pub fn should_write(
    stored: Option<&AutoscalingStatus>,
    current: u32,
    decision: &Decision,
    last_written_ms: Option<u64>,
    now_ms: u64,
) -> bool {
    let Some(stored) = stored else { return true };
    if decision.desired != current {
        return true;
    }
    let stale_display = last_written_ms.is_none_or(|t| now_ms.saturating_sub(t) >= DISPLAY_REFRESH_MS);
    let display_moved = stored.metrics != metric_statuses(decision) || stored.reason != decision.reason;
    stale_display && display_moved
}

/// Appends `event`, keeping the newest [`SCALING_HISTORY`] entries.
pub fn push_history(history: &mut Vec<ScalingEvent>, event: ScalingEvent) {
    history.push(event);
    let over = history.len().saturating_sub(SCALING_HISTORY);
    history.drain(..over);
}

/// The status to write: the stored one (or a fresh one) with the decision's count, reason
/// and metrics, stamped with the wall clock (`wall_unix_ms`), and a history entry when the
/// count changes from `current`.
pub fn next_status(
    stored: Option<&AutoscalingStatus>,
    current: u32,
    decision: &Decision,
    wall_unix_ms: i64,
) -> AutoscalingStatus {
    let wall = wall_unix_ms.max(0) as u64;
    let mut next = stored.cloned().unwrap_or_default();
    if decision.desired != current {
        let event = ScalingEvent { at_ms: wall, from: current, to: decision.desired, reason: decision.reason.clone() };
        push_history(&mut next.history, event);
    }
    next.desired_replicas = decision.desired;
    next.reason = decision.reason.clone();
    next.metrics = metric_statuses(decision);
    next.evaluated_at_ms = wall;
    next
}

#[cfg(test)]
mod tests {
    use flotilla_api::spec::Bounds;

    use super::*;
    use crate::autoscale::Observed;

    fn decision(desired: u32, reason: &str, value: f64) -> Decision {
        Decision {
            desired,
            reason: reason.into(),
            metrics: vec![Observed { name: "running".into(), value: Some(value), target: 4.0 }],
            panicking: false,
            bounds: Bounds { min: 0, max: 10, schedule: None },
        }
    }

    fn stored(desired: u32, reason: &str, value: f64) -> AutoscalingStatus {
        let d = decision(desired, reason, value);
        AutoscalingStatus {
            desired_replicas: desired,
            reason: reason.into(),
            metrics: metric_statuses(&d),
            history: vec![],
            evaluated_at_ms: 1,
        }
    }

    #[test]
    fn writes_on_a_change_and_refreshes_the_display_at_most_every_15s() {
        let same = stored(2, "steady", 3.0);
        // (stored, current, decision, last written, now) -> write
        let cases = [
            (None, 2, decision(2, "steady", 3.0), Some(100_000), 100_000, true),
            (Some(&same), 2, decision(3, "up", 9.0), Some(100_000), 100_000, true),
            (Some(&same), 2, decision(1, "down", 1.0), Some(100_000), 100_001, true),
            (Some(&same), 2, decision(2, "steady", 3.0), None, 100_000, false),
            (Some(&same), 2, decision(2, "steady", 3.0), Some(0), 100_000, false),
            (Some(&same), 2, decision(2, "steady", 3.5), None, 100_000, true),
            (Some(&same), 2, decision(2, "steady", 3.5), Some(90_000), 100_000, false),
            (Some(&same), 2, decision(2, "steady", 3.5), Some(85_000), 100_000, true),
            (Some(&same), 2, decision(2, "other words", 3.0), Some(84_000), 100_000, true),
            (Some(&same), 2, decision(2, "other words", 3.0), Some(85_001), 100_000, false),
        ];
        for (i, (s, current, d, last, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(should_write(s, current, &d, last, now), want, "case {i}");
        }
    }

    fn event(i: u64) -> ScalingEvent {
        ScalingEvent { at_ms: i, from: 1, to: 2, reason: format!("e{i}") }
    }

    #[test]
    fn history_keeps_the_newest_entries() {
        // (entries before) -> (entries after, oldest kept)
        let cases = [(0, 1, 0), (1, 2, 0), (19, 20, 0), (20, 20, 1), (25, 20, 6)];
        for (before, after, oldest) in cases {
            let mut h: Vec<ScalingEvent> = (0..before).map(event).collect();
            push_history(&mut h, event(before));
            assert_eq!(h.len(), after, "{before} before");
            assert_eq!(h.first().map(|e| e.at_ms), Some(oldest), "{before} before");
            assert_eq!(h.last().map(|e| e.at_ms), Some(before), "newest last");
        }
    }

    #[test]
    fn next_status_records_the_decision_and_a_change_in_the_history() {
        let mut old = stored(2, "steady", 3.0);
        old.history = vec![event(7)];
        // (current, decision, wall) -> (history length, newest entry)
        let up = decision(3, "up", 9.0);
        let got = next_status(Some(&old), 2, &up, 5_000);
        assert_eq!((got.desired_replicas, got.reason.as_str(), got.evaluated_at_ms), (3, "up", 5_000));
        assert_eq!(got.metrics, metric_statuses(&up));
        assert_eq!(got.history, vec![event(7), ScalingEvent { at_ms: 5_000, from: 2, to: 3, reason: "up".into() }]);

        let steady = decision(2, "steady", 3.5);
        let got = next_status(Some(&old), 2, &steady, 6_000);
        assert_eq!(got.history, vec![event(7)], "no change of the count, no entry");
        assert_eq!((got.desired_replicas, got.evaluated_at_ms), (2, 6_000));
        assert_eq!(got.metrics[0].value, Some(3.5));

        let first = next_status(None, 0, &decision(1, "scale from zero", 0.0), -5);
        assert_eq!(first.evaluated_at_ms, 0, "a wall clock before 1970 reads as 0");
        assert_eq!(first.history.len(), 1);
        assert_eq!((first.history[0].from, first.history[0].to), (0, 1));
    }
}
