//! The event log: what the controllers did and why (a rollout step, a replacement for a
//! lost node, a rollout that completed), as `kubectl get events` shows for Kubernetes.
//!
//! A controller attaches its notes to the write they explain ([`crate::Command::Recorded`]),
//! so a note is kept exactly when its write takes effect, at that write's revision, on every
//! server alike; a write that fails its compare records nothing. Like the audit log it is
//! replicated state, bounded by a fixed count ([`KEPT`]) and carried in snapshots.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// How many events are kept.
pub const KEPT: usize = 5_000;
/// Longest message kept (longer ones are cut at a character boundary).
pub const MAX_MESSAGE: usize = 1_024;

/// What a controller says about an object, as proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// `kind/name` of the object it is about (`model/llama`).
    pub object: String,
    /// A short CamelCase word: `RolloutStarted`, `RolloutStep`, `NodeNotReady`, …
    pub reason: String,
    pub message: String,
    /// Who did it: `controller/model`, …
    pub by: String,
    /// Wall-clock time at the proposer, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// A kept event: a note and the store revision of the write it explains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub revision: u64,
    #[serde(flatten)]
    pub note: Note,
}

/// The kept events, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventLog {
    events: VecDeque<Event>,
}

fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl EventLog {
    pub fn push(&mut self, revision: u64, note: &Note) {
        let mut note = note.clone();
        note.message = cut(&note.message, MAX_MESSAGE);
        note.reason = cut(&note.reason, 64);
        note.object = cut(&note.object, 256);
        note.by = cut(&note.by, 64);
        crate::revision_log::push(&mut self.events, Event { revision, note }, KEPT);
    }

    /// Events at or after revision `since` about `object` (all when empty), oldest first,
    /// the newest `limit` when more match.
    pub fn query(&self, since: u64, object: &str, limit: usize) -> Vec<Event> {
        let keep = |e: &Event| object.is_empty() || e.note.object == object;
        crate::revision_log::query(&self.events, since, |e| e.revision, keep, limit)
    }

    /// The revision of the oldest kept event (0 when empty).
    pub fn oldest(&self) -> u64 {
        self.events.front().map_or(0, |e| e.revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(object: &str, message: &str) -> Note {
        Note {
            object: object.into(),
            reason: "RolloutStep".into(),
            message: message.into(),
            by: "controller/model".into(),
            at_ms: 1,
        }
    }

    #[test]
    fn queries_filter_by_revision_and_object_and_keep_the_newest() {
        let mut log = EventLog::default();
        for r in 1..=6 {
            log.push(r, &note(if r % 2 == 0 { "model/a" } else { "model/b" }, "m"));
        }
        let revs = |v: Vec<Event>| v.iter().map(|e| e.revision).collect::<Vec<_>>();
        assert_eq!(revs(log.query(0, "", 100)), [1, 2, 3, 4, 5, 6]);
        assert_eq!(revs(log.query(3, "model/a", 100)), [4, 6]);
        assert_eq!(revs(log.query(0, "", 2)), [5, 6]);
        assert_eq!(revs(log.query(0, "model/c", 100)), Vec::<u64>::new());
    }

    #[test]
    fn bounded_in_count_and_size() {
        let mut log = EventLog::default();
        for r in 0..(KEPT as u64 + 3) {
            log.push(r, &note("model/a", "m"));
        }
        assert_eq!((log.events.len(), log.oldest()), (KEPT, 3));
        log.push(9_999_999, &note("model/a", &"é".repeat(MAX_MESSAGE)));
        let last = log.events.back().unwrap();
        assert!(last.note.message.len() <= MAX_MESSAGE && last.note.message.starts_with('é'));
        let back: EventLog = serde_json::from_slice(&serde_json::to_vec(&log).unwrap()).unwrap();
        assert_eq!(back, log);
    }
}
