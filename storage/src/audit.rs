//! The audit log: who made each write through the API, what it touched and how it ended.
//!
//! A write made through the API carries its caller into the Raft command
//! ([`crate::Command::Audited`]), so every server records the same entry at the same
//! revision, and the log survives the loss of any minority of servers like the objects do.
//! The proposer fills in the caller and the time; the state machine adds the outcome.
//!
//! Bounded to the last [`KEPT`] entries (a fixed count: the log is replicated state and must
//! be the same on every server, so no setting may change it). The controllers' and agents'
//! own status writes are not in it: they are the system's, seen in the watch history.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::CommandResult;

/// How many audit entries are kept.
pub const KEPT: usize = 10_000;

/// Who asked for a write, as the proposing server saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The caller's identity (`role/name`), or `anonymous` with security off.
    pub who: String,
    /// The API method (`Apply`, `Delete`, `AddMember`, ...).
    pub method: String,
    /// What the write is about: `kind/name` for an object, `member/ID` for a member.
    pub target: String,
    /// The caller's address as the first server saw it.
    pub from: String,
    /// Wall-clock time at the proposing server, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// One audited write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The store revision after the write (the object's new revision when it changed one).
    pub revision: u64,
    #[serde(flatten)]
    pub caller: Caller,
    /// `created`, `updated`, `unchanged`, `deleted`, `conflict`, `not_found`, `applied`.
    pub result: String,
}

/// What a command's result means in the audit log.
pub fn outcome(result: &CommandResult) -> &'static str {
    match result {
        CommandResult::Put { created: true, .. } => "created",
        CommandResult::Put { unchanged: true, .. } => "unchanged",
        CommandResult::Put { .. } => "updated",
        CommandResult::Deleted { .. } => "deleted",
        CommandResult::Conflict { .. } => "conflict",
        CommandResult::NotFound { .. } => "not_found",
        CommandResult::Txn { .. } | CommandResult::None | CommandResult::Batch(_) => "applied",
        CommandResult::AlreadyApplied { .. } => "repeat",
    }
}

/// The kept entries, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AuditLog {
    entries: VecDeque<Entry>,
}

impl AuditLog {
    pub fn push(&mut self, entry: Entry) {
        crate::revision_log::push(&mut self.entries, entry, KEPT);
    }

    /// Entries at or after store revision `since` whose caller contains `who` (all when
    /// empty), oldest first, at most `limit` of them — the newest `limit` when more match.
    /// Inclusive: several entries may share a revision (a conflict, a membership change and
    /// the write before them), and none of them may be skipped.
    pub fn query(&self, since: u64, who: &str, limit: usize) -> Vec<Entry> {
        let keep = |e: &Entry| who.is_empty() || e.caller.who.contains(who);
        crate::revision_log::query(&self.entries, since, |e| e.revision, keep, limit)
    }

    /// The revision of the oldest kept entry (0 when empty): earlier ones were dropped.
    pub fn oldest(&self) -> u64 {
        self.entries.front().map_or(0, |e| e.revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(revision: u64, who: &str) -> Entry {
        let caller = Caller {
            who: who.into(),
            method: "Apply".into(),
            target: "model/m".into(),
            from: "127.0.0.1:1".into(),
            at_ms: 1,
        };
        Entry { revision, caller, result: "updated".into() }
    }

    #[test]
    fn queries_filter_by_revision_and_caller_and_keep_the_newest() {
        let mut log = AuditLog::default();
        for r in 1..=6 {
            log.push(entry(r, if r % 2 == 0 { "admin/alice" } else { "operator/olga" }));
        }
        let revs = |v: Vec<Entry>| v.iter().map(|e| e.revision).collect::<Vec<_>>();
        assert_eq!(revs(log.query(0, "", 100)), [1, 2, 3, 4, 5, 6]);
        assert_eq!(revs(log.query(4, "", 100)), [4, 5, 6]);
        assert_eq!(revs(log.query(0, "alice", 100)), [2, 4, 6]);
        assert_eq!(revs(log.query(0, "", 2)), [5, 6], "the newest when limited");
        assert_eq!(revs(log.query(7, "", 100)), Vec::<u64>::new());
        log.push(entry(6, "admin/bob")); // a conflict after the write of revision 6
        assert_eq!(revs(log.query(6, "", 100)), [6, 6]);
    }

    #[test]
    fn the_log_is_bounded_and_round_trips() {
        let mut log = AuditLog::default();
        for r in 0..(KEPT as u64 + 5) {
            log.push(entry(r, "admin/a"));
        }
        assert_eq!(log.entries.len(), KEPT);
        assert_eq!(log.oldest(), 5);
        let back: AuditLog = serde_json::from_slice(&serde_json::to_vec(&log).unwrap()).unwrap();
        assert_eq!(back, log);
    }
}
