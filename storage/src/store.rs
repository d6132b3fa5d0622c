//! The state machine's data, in memory: objects by key, the store revision, and a bounded
//! history of change events for watches. Pure: `apply` is a function of (state, command)
//! that changes the state and returns the result. Nothing is persisted per apply: the
//! state machine is persisted by snapshots of this whole struct (docs/adr/002).
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use flotilla_api::{EventType, Kind, LabelSelector, ObjectKey, StoredObject, WatchEvent};
use serde::{Deserialize, Serialize};

use crate::applied::{AppliedRequests, Outcome};
use crate::audit::{self, AuditLog};
use crate::command::{Compare, TxnOp};
use crate::eventlog::{self, EventLog};
use crate::objects::Objects;
use crate::{Command, CommandResult};

/// How many change events are kept for resuming watches, by default.
pub const DEFAULT_EVENT_RETENTION: usize = 10_000;

/// A watch asked to resume from a revision whose events were already dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Events up to and including this revision are gone.
    pub compacted: u64,
}

/// The whole replicated state (it is also the snapshot format).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Store {
    /// By key, with a derived index by model label (`crate::objects`); a list in snapshots.
    objects: Objects,
    events: VecDeque<WatchEvent>,
    revision: u64,
    compacted: u64,
    /// Requests that changed state, for exactly-once retries (`crate::applied`). Absent
    /// from snapshots written before it existed.
    #[serde(default)]
    applied: AppliedRequests,
    /// Writes made through the API, who made them and how they ended (`crate::audit`).
    #[serde(default)]
    audit: AuditLog,
    /// What the controllers did and why (`crate::eventlog`).
    #[serde(default)]
    event_log: EventLog,
    #[serde(skip, default = "default_retention")]
    retention: usize,
}

fn default_retention() -> usize {
    DEFAULT_EVENT_RETENTION
}

impl Store {
    pub fn new(retention: usize) -> Store {
        Store { retention: retention.max(1), ..Store::default() }
    }

    /// Rebuilds a store from persisted parts (objects, events in any order, counters).
    pub fn from_parts(
        objects: impl IntoIterator<Item = StoredObject>,
        events: impl IntoIterator<Item = WatchEvent>,
        revision: u64,
        compacted: u64,
        retention: usize,
    ) -> Store {
        let mut events: Vec<_> = events.into_iter().collect();
        events.sort_by_key(|e| e.revision);
        Store {
            objects: objects.into_iter().collect(),
            events: events.into(),
            revision,
            compacted,
            applied: AppliedRequests::default(),
            audit: AuditLog::default(),
            event_log: EventLog::default(),
            retention: retention.max(1),
        }
    }

    pub fn retention(&self) -> usize {
        self.retention
    }

    pub fn set_retention(&mut self, retention: usize) {
        self.retention = retention.max(1);
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    pub fn objects(&self) -> impl Iterator<Item = &StoredObject> {
        self.objects.values()
    }

    pub fn events(&self) -> impl Iterator<Item = &WatchEvent> {
        self.events.iter()
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&StoredObject> {
        self.objects.get(key)
    }

    /// The objects of `kind` that `selector` matches, in key order; one model's objects
    /// (an equality on the `model` label) are found by index, not by a scan of the kind.
    pub fn list(&self, kind: Kind, selector: &LabelSelector) -> Vec<StoredObject> {
        self.objects.list(kind, selector)
    }

    /// [`Store::list`], sharing the objects instead of copying them.
    pub fn list_shared(&self, kind: Kind, selector: &LabelSelector) -> Vec<Arc<StoredObject>> {
        self.objects.list_shared(kind, selector)
    }

    /// Events of `kind` (all kinds if `None`) with revision > `after`, at most `limit`, and
    /// the revision the scan covered: a watcher may resume from it without missing an event
    /// (it skips past other kinds' events, so a quiet watch is never compacted away).
    pub fn events_after(
        &self,
        kind: Option<Kind>,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<WatchEvent>, u64), Compacted> {
        if after < self.compacted {
            return Err(Compacted { compacted: self.compacted });
        }
        let start = self.events.partition_point(|e| e.revision <= after);
        let events: Vec<WatchEvent> = self
            .events
            .range(start..)
            .filter(|e| kind.is_none_or(|k| e.object.key.kind == k))
            .take(limit)
            .cloned()
            .collect();
        let scanned_to = match events.last() {
            Some(last) if events.len() == limit => last.revision,
            _ => self.revision.max(after),
        };
        Ok((events, scanned_to))
    }

    /// Applies one command; returns its result.
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        let (key, expected) = match cmd {
            Command::Put { key, expected_revision, .. }
            | Command::PutStatus { key, expected_revision, .. }
            | Command::Delete { key, expected_revision } => (key, *expected_revision),
            Command::Txn { compares, ops } => return self.apply_txn(compares, ops),
            Command::Batch(cmds) => return CommandResult::Batch(cmds.iter().map(|c| self.apply(c)).collect()),
            Command::Once { id, command } => return self.apply_once(*id, command),
            Command::Audited { caller, command } => {
                let result = self.apply(command);
                let entry = audit::Entry {
                    revision: self.revision,
                    caller: caller.clone(),
                    result: audit::outcome(&result).into(),
                };
                self.audit.push(entry);
                return result;
            }
            Command::Recorded { notes, command } => {
                let result = self.apply(command);
                if !matches!(result, CommandResult::Conflict { .. } | CommandResult::NotFound { .. }) {
                    for n in notes {
                        self.event_log.push(self.revision, n);
                    }
                }
                return result;
            }
        };
        let current = self.objects.get(key);
        let actual = current.map_or(0, |o| o.revision);
        if let Some(expected) = expected {
            if expected != actual {
                return CommandResult::Conflict { key: key.clone(), expected, actual };
            }
        }
        match cmd {
            Command::Put { key, uid, labels, spec, .. } => {
                let next = match current {
                    Some(cur) if &cur.labels == labels && &cur.spec == spec => {
                        return CommandResult::Put { object: cur.clone(), created: false, unchanged: true };
                    }
                    Some(cur) => StoredObject { labels: labels.clone(), spec: spec.clone(), ..cur.clone() },
                    None => StoredObject {
                        key: key.clone(),
                        uid: uid.clone(),
                        labels: labels.clone(),
                        spec: spec.clone(),
                        status: serde_json::Value::Null,
                        revision: 0,
                        create_revision: self.revision + 1,
                    },
                };
                let created = current.is_none();
                let object = self.commit_put(next);
                CommandResult::Put { object, created, unchanged: false }
            }
            Command::PutStatus { key, status, .. } => {
                let Some(cur) = current else {
                    return CommandResult::NotFound { key: key.clone() };
                };
                if &cur.status == status {
                    return CommandResult::Put { object: cur.clone(), created: false, unchanged: true };
                }
                let next = StoredObject { status: status.clone(), ..cur.clone() };
                let object = self.commit_put(next);
                CommandResult::Put { object, created: false, unchanged: false }
            }
            Command::Delete { key, .. } => match self.delete(key) {
                Some(object) => CommandResult::Deleted { object, revision: self.revision },
                None => CommandResult::NotFound { key: key.clone() },
            },
            Command::Txn { .. }
            | Command::Batch(_)
            | Command::Once { .. }
            | Command::Audited { .. }
            | Command::Recorded { .. } => {
                unreachable!("handled above")
            }
        }
    }

    /// Applies `command` unless request `id` already changed state, in which case its first
    /// result is answered again (`crate::applied`).
    fn apply_once(&mut self, id: u128, command: &Command) -> CommandResult {
        if let Some(first) = self.applied_result(id, command.key()) {
            return first;
        }
        let result = self.apply(command);
        let outcome = match &result {
            CommandResult::Put { object, created, unchanged: false } => {
                Some(Outcome::Put { revision: object.revision, created: *created })
            }
            CommandResult::Deleted { revision, .. } => Some(Outcome::Deleted { revision: *revision }),
            CommandResult::Txn { revision } => Some(Outcome::Txn { revision: *revision }),
            _ => None,
        };
        if let Some(outcome) = outcome {
            self.applied.insert(id, outcome);
        }
        result
    }

    /// The result request `id` had when it was applied, if it changed state; `key` is the
    /// object it wrote (none for a transaction). Rebuilt from the object as it is now or
    /// from the watch history; [`CommandResult::AlreadyApplied`] where neither reaches back.
    pub fn applied_result(&self, id: u128, key: Option<&ObjectKey>) -> Option<CommandResult> {
        let outcome = self.applied.get(id)?;
        let rebuilt = match (outcome, key) {
            (Outcome::Txn { revision }, _) => Some(CommandResult::Txn { revision }),
            (Outcome::Put { revision, created }, Some(key)) => self
                .objects
                .get(key)
                .filter(|o| o.revision == revision)
                .cloned()
                .or_else(|| self.event_at(revision, key, EventType::Put))
                .map(|object| CommandResult::Put { object, created, unchanged: false }),
            (Outcome::Deleted { revision }, Some(key)) => self
                .event_at(revision, key, EventType::Delete)
                .map(|object| CommandResult::Deleted { object, revision }),
            (_, None) => None,
        };
        let revision = match outcome {
            Outcome::Put { revision, .. } | Outcome::Deleted { revision } | Outcome::Txn { revision } => revision,
        };
        Some(rebuilt.unwrap_or(CommandResult::AlreadyApplied { revision }))
    }

    /// See [`AuditLog::query`].
    pub fn audit(&self, since: u64, who: &str, limit: usize) -> Vec<audit::Entry> {
        self.audit.query(since, who, limit)
    }

    /// Events at or after `since` about `object` (all when empty), see [`EventLog::query`].
    pub fn events_since(&self, since: u64, object: &str, limit: usize) -> Vec<eventlog::Event> {
        self.event_log.query(since, object, limit)
    }

    /// The revision of the oldest event kept.
    pub fn events_oldest(&self) -> u64 {
        self.event_log.oldest()
    }

    /// The revision of the oldest audit entry kept.
    pub fn audit_oldest(&self) -> u64 {
        self.audit.oldest()
    }

    /// The object of the `event_type` event of `key` at `revision`, if the history holds it.
    fn event_at(&self, revision: u64, key: &ObjectKey, event_type: EventType) -> Option<StoredObject> {
        let i = self.events.partition_point(|e| e.revision < revision);
        self.events
            .get(i)
            .filter(|e| e.revision == revision && &e.object.key == key && e.event_type == event_type)
            .map(|e| e.object.clone())
    }

    fn delete(&mut self, key: &ObjectKey) -> Option<StoredObject> {
        let object = Arc::unwrap_or_clone(self.objects.remove(key)?);
        self.revision += 1;
        self.record(EventType::Delete, object.clone());
        Some(object)
    }

    /// Checks every compare and that every op's target exists where it must (given the
    /// earlier ops), then applies all ops; on any failure nothing changes.
    fn apply_txn(&mut self, compares: &[Compare], ops: &[TxnOp]) -> CommandResult {
        for c in compares {
            let actual = self.objects.get(&c.key).map_or(0, |o| o.revision);
            if actual != c.revision {
                return CommandResult::Conflict { key: c.key.clone(), expected: c.revision, actual };
            }
        }
        let mut exists: BTreeMap<&ObjectKey, bool> = BTreeMap::new();
        for op in ops {
            let key = op.key();
            let present = *exists.entry(key).or_insert_with(|| self.objects.contains_key(key));
            if !present && !matches!(op, TxnOp::Put { .. }) {
                return CommandResult::NotFound { key: key.clone() };
            }
            exists.insert(key, !matches!(op, TxnOp::Delete { .. }));
        }
        for op in ops {
            match op {
                TxnOp::Put { key, uid, labels, spec, status } => {
                    let next = match self.objects.get(key) {
                        Some(cur) => StoredObject {
                            labels: labels.clone(),
                            spec: spec.clone(),
                            status: status.clone().unwrap_or_else(|| cur.status.clone()),
                            ..cur.clone()
                        },
                        None => StoredObject {
                            key: key.clone(),
                            uid: uid.clone(),
                            labels: labels.clone(),
                            spec: spec.clone(),
                            status: status.clone().unwrap_or(serde_json::Value::Null),
                            revision: 0,
                            create_revision: self.revision + 1,
                        },
                    };
                    if self.objects.get(key) != Some(&next) {
                        self.commit_put(next);
                    }
                }
                TxnOp::PutStatus { key, status } => {
                    let cur = self.objects.get(key).expect("checked above");
                    if &cur.status != status {
                        let next = StoredObject { status: status.clone(), ..cur.clone() };
                        self.commit_put(next);
                    }
                }
                TxnOp::Delete { key } => {
                    self.delete(key);
                }
            }
        }
        CommandResult::Txn { revision: self.revision }
    }

    fn commit_put(&mut self, mut object: StoredObject) -> StoredObject {
        self.revision += 1;
        object.revision = self.revision;
        self.objects.insert(object.clone());
        self.record(EventType::Put, object.clone());
        object
    }

    fn record(&mut self, event_type: EventType, object: StoredObject) {
        self.events.push_back(WatchEvent { revision: self.revision, event_type, object });
        if self.events.len() > self.retention {
            let drop = self.events.len() - self.retention;
            self.events.drain(..drop);
            self.compacted = self.events.front().map_or(self.revision, |e| e.revision - 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::selector::MODEL_LABEL;
    use serde_json::json;

    fn key(name: &str) -> ObjectKey {
        ObjectKey { kind: Kind::Model, name: name.parse().unwrap() }
    }

    fn put(name: &str, replicas: u32, expected: Option<u64>) -> Command {
        Command::Put {
            key: key(name),
            uid: format!("uid-{name}"),
            labels: BTreeMap::new(),
            spec: json!({ "replicas": replicas }),
            expected_revision: expected,
        }
    }

    #[test]
    fn revisions_increase_and_identical_apply_is_unchanged() {
        let mut s = Store::new(100);
        let CommandResult::Put { object, created: true, .. } = s.apply(&put("a", 1, None)) else { panic!() };
        assert_eq!((object.revision, object.create_revision), (1, 1));
        let r = s.apply(&put("a", 1, None));
        assert!(matches!(r, CommandResult::Put { unchanged: true, .. }));
        assert_eq!(s.revision(), 1);
        let CommandResult::Put { object, created: false, .. } = s.apply(&put("a", 2, None)) else { panic!() };
        assert_eq!((object.revision, object.create_revision, object.uid.as_str()), (2, 1, "uid-a"));
    }

    #[test]
    fn compare_and_set_conflict_changes_nothing() {
        let mut s = Store::new(100);
        s.apply(&put("a", 1, Some(0)));
        let before = s.clone();
        let r = s.apply(&put("a", 5, Some(7)));
        assert_eq!(r, CommandResult::Conflict { key: key("a"), expected: 7, actual: 1 });
        assert_eq!(s, before);
        let r = s.apply(&put("b", 1, Some(3)));
        assert!(matches!(r, CommandResult::Conflict { actual: 0, .. }));
        assert!(matches!(s.apply(&put("a", 5, Some(1))), CommandResult::Put { .. }));
    }

    #[test]
    fn delete_and_events() {
        let mut s = Store::new(100);
        s.apply(&put("a", 1, None));
        s.apply(&put("b", 1, None));
        assert!(matches!(
            s.apply(&Command::Delete { key: key("a"), expected_revision: None }),
            CommandResult::Deleted { revision: 3, .. }
        ));
        assert!(matches!(
            s.apply(&Command::Delete { key: key("a"), expected_revision: None }),
            CommandResult::NotFound { .. }
        ));
        let (ev, to) = s.events_after(Some(Kind::Model), 1, 10).unwrap();
        assert_eq!(to, 3);
        assert_eq!(
            ev.iter().map(|e| (e.revision, e.event_type)).collect::<Vec<_>>(),
            vec![(2, EventType::Put), (3, EventType::Delete)]
        );
        assert_eq!(s.events_after(Some(Kind::Tenant), 0, 10).unwrap(), (vec![], 3));
        let (ev, to) = s.events_after(None, 0, 2).unwrap();
        assert_eq!((ev.len(), to), (2, 2));
    }

    #[test]
    fn list_returns_exactly_one_kinds_objects() {
        let mut s = Store::new(100);
        for kind in Kind::ALL {
            for n in ["a", "m", "z"] {
                let cmd = Command::Put {
                    key: ObjectKey { kind, name: n.parse().unwrap() },
                    uid: format!("{kind}-{n}"),
                    labels: BTreeMap::from([("tier".to_owned(), n.to_owned())]),
                    spec: serde_json::json!({}),
                    expected_revision: None,
                };
                s.apply(&cmd);
            }
        }
        for kind in Kind::ALL {
            let all: Vec<String> = s.list(kind, &LabelSelector::default()).iter().map(|o| o.uid.clone()).collect();
            assert_eq!(all, ["a", "m", "z"].map(|n| format!("{kind}-{n}")), "{kind}");
            let m = s.list(kind, &LabelSelector::label_eq("tier", "m"));
            assert_eq!(m.iter().map(|o| o.uid.clone()).collect::<Vec<_>>(), [format!("{kind}-m")]);
        }
    }

    /// What `list` must return: every object of `kind` that `selector` matches, in key order.
    fn scan(s: &Store, kind: Kind, selector: &LabelSelector) -> Vec<StoredObject> {
        s.objects().filter(|o| o.key.kind == kind && selector.matches(&o.labels)).cloned().collect()
    }

    fn assert_list_is_a_scan(s: &Store, step: &str) {
        assert!(s.objects.index_is_derived(), "{step}: the index drifted from the objects");
        for kind in [Kind::Replica, Kind::Model, Kind::Adapter] {
            for m in ["a", "b", "c", "zz"] {
                for sel in [
                    LabelSelector::label_eq(MODEL_LABEL, m),
                    LabelSelector::parse(&format!("{MODEL_LABEL}={m},tier=gold")).unwrap(),
                    LabelSelector::parse(&format!("tier=gold,{MODEL_LABEL}={m}")).unwrap(),
                    LabelSelector::parse(&format!("{MODEL_LABEL}={m},{MODEL_LABEL}=a")).unwrap(),
                ] {
                    assert_eq!(s.list(kind, &sel), scan(s, kind, &sel), "{step}: {kind} {sel:?}");
                }
            }
            let all = LabelSelector::default();
            assert_eq!(s.list(kind, &all), scan(s, kind, &all), "{step}: {kind}");
        }
    }

    #[test]
    fn the_model_index_lists_what_a_full_scan_finds_across_puts_deletes_and_snapshots() {
        // A fixed pseudo-random walk (xorshift): puts that add, move or drop the model label,
        // deletes, transactions, status writes; the index must equal a rebuild every step.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut s = Store::new(50);
        let kinds = [Kind::Replica, Kind::Model, Kind::Adapter];
        for step in 0..3000 {
            let key = ObjectKey { kind: kinds[next(3) as usize], name: format!("o{}", next(12)).parse().unwrap() };
            let mut labels = BTreeMap::new();
            if let Some(m) = ["a", "b", "c"].get(next(4) as usize) {
                labels.insert(MODEL_LABEL.to_owned(), (*m).to_owned());
            }
            if next(2) == 0 {
                labels.insert("tier".to_owned(), "gold".to_owned());
            }
            let spec = json!({ "step": step });
            let cmd = match next(6) {
                0 => Command::Delete { key, expected_revision: None },
                1 => Command::PutStatus { key, status: json!({ "step": step }), expected_revision: None },
                2 => Command::Txn {
                    compares: vec![],
                    ops: vec![
                        TxnOp::Put { key: key.clone(), uid: "u".into(), labels, spec, status: None },
                        TxnOp::Delete { key: key.clone() },
                    ][..1 + next(2) as usize]
                        .to_vec(),
                },
                _ => Command::Put { key, uid: "u".into(), labels, spec, expected_revision: None },
            };
            s.apply(&cmd);
            assert_list_is_a_scan(&s, &format!("step {step} {cmd:?}"));
            if step % 500 == 499 {
                // A snapshot installed (or loaded) and the legacy tree's parts rebuild it.
                let mut back: Store = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
                back.set_retention(50);
                assert_eq!(back, s);
                assert_list_is_a_scan(&back, &format!("snapshot at step {step}"));
                let parts =
                    Store::from_parts(s.objects().cloned(), s.events().cloned(), s.revision(), s.compacted(), 50);
                assert_list_is_a_scan(&parts, &format!("from parts at step {step}"));
                s = back;
            }
        }
        assert!(s.objects().any(|o| o.labels.contains_key(MODEL_LABEL)), "the walk indexed something");
    }

    #[test]
    fn retention_compacts_old_events() {
        let mut s = Store::new(3);
        for i in 0..5 {
            s.apply(&put("a", i, None));
        }
        assert_eq!(s.compacted(), 2);
        assert_eq!(s.events_after(None, 1, 10), Err(Compacted { compacted: 2 }));
        let revs: Vec<_> = s.events_after(None, 2, 10).unwrap().0.iter().map(|e| e.revision).collect();
        assert_eq!(revs, vec![3, 4, 5]);
        // The dropped events are gone from the store itself (and so from its snapshots).
        assert_eq!(s.events().map(|e| e.revision).collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn snapshot_format_round_trips() {
        let mut s = Store::new(10);
        s.apply(&put("a", 1, None));
        s.apply(&put("b", 2, None));
        let bytes = serde_json::to_vec(&s).unwrap();
        let mut back: Store = serde_json::from_slice(&bytes).unwrap();
        back.set_retention(10);
        assert_eq!(back, s);
    }

    fn once(id: u128, cmd: Command) -> Command {
        Command::Once { id, command: Box::new(cmd) }
    }

    #[test]
    fn a_repeated_request_takes_effect_once_and_answers_its_first_result() {
        let mut s = Store::new(100);
        // A compare-and-set committed, then retried by a forward that lost the answer: the
        // repeat answers the same success, not a conflict against its own write.
        let first = s.apply(&once(7, put("a", 1, Some(0))));
        assert!(matches!(&first, CommandResult::Put { object, created: true, .. } if object.revision == 1));
        assert_eq!(s.apply(&once(7, put("a", 1, Some(0)))), first);
        // Another writer moves the object on; the repeat still answers its own result (from
        // the watch history) and writes nothing.
        s.apply(&put("a", 2, None));
        let before = s.clone();
        assert_eq!(s.apply(&once(7, put("a", 1, Some(0)))), first);
        assert_eq!(s, before, "a repeat changes nothing");
        // A blind write repeated after another writer is not applied twice.
        let w = s.apply(&once(8, put("a", 3, None)));
        s.apply(&put("a", 4, None));
        assert_eq!(s.apply(&once(8, put("a", 3, None))), w);
        assert_eq!(s.get(&key("a")).unwrap().spec, json!({ "replicas": 4 }));
        // Deletes too.
        let d = s.apply(&once(9, Command::Delete { key: key("a"), expected_revision: None }));
        assert!(matches!(d, CommandResult::Deleted { .. }));
        s.apply(&put("a", 5, None));
        assert_eq!(s.apply(&once(9, Command::Delete { key: key("a"), expected_revision: None })), d);
        assert!(s.get(&key("a")).is_some(), "the repeat did not delete the new object");
    }

    #[test]
    fn a_request_that_changed_nothing_runs_again_on_a_repeat() {
        let mut s = Store::new(100);
        s.apply(&put("a", 1, None));
        // A conflict changed nothing: the retry is the request's first effect.
        assert!(matches!(s.apply(&once(1, put("a", 2, Some(5)))), CommandResult::Conflict { .. }));
        assert!(matches!(s.apply(&once(1, put("a", 2, Some(1)))), CommandResult::Put { unchanged: false, .. }));
        // So does an unchanged put.
        assert!(matches!(s.apply(&once(2, put("a", 2, None))), CommandResult::Put { unchanged: true, .. }));
        assert!(matches!(s.apply(&once(2, put("a", 3, None))), CommandResult::Put { unchanged: false, .. }));
    }

    #[test]
    fn a_repeat_whose_answer_is_gone_says_so_and_the_record_survives_snapshots() {
        let mut s = Store::new(2);
        s.apply(&once(1, put("a", 1, None)));
        for i in 2..6 {
            s.apply(&put("a", i, None));
        }
        // The object moved on and the history no longer holds revision 1.
        let before = s.clone();
        assert_eq!(s.apply(&once(1, put("a", 1, None))), CommandResult::AlreadyApplied { revision: 1 });
        assert_eq!(s, before);
        let mut back: Store = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        back.set_retention(2);
        assert_eq!(back.apply(&once(1, put("a", 1, None))), CommandResult::AlreadyApplied { revision: 1 });
        // A snapshot from before the record existed loads with none.
        let mut old = serde_json::to_value(&s).unwrap();
        old.as_object_mut().unwrap().remove("applied");
        let old: Store = serde_json::from_value(old).unwrap();
        assert!(old.applied.is_empty());
    }

    #[test]
    fn api_writes_are_audited_once_with_their_outcome() {
        let mut s = Store::new(100);
        let audited = |who: &str, cmd: Command| Command::Audited {
            caller: audit::Caller {
                who: who.into(),
                method: "Apply".into(),
                target: "model/a".into(),
                from: "127.0.0.1:9".into(),
                at_ms: 5,
            },
            command: Box::new(cmd),
        };
        s.apply(&once(1, audited("admin/alice", put("a", 1, None))));
        s.apply(&once(1, audited("admin/alice", put("a", 1, None)))); // a retried forward
        s.apply(&put("a", 2, None)); // a controller's write: not audited
        s.apply(&once(2, audited("operator/olga", put("a", 3, Some(1)))));
        let got: Vec<_> = s.audit(0, "", 10).into_iter().map(|e| (e.revision, e.caller.who, e.result)).collect();
        assert_eq!(
            got,
            [(1, "admin/alice".to_string(), "created".to_string()), (2, "operator/olga".into(), "conflict".into())]
        );
        let back: Store = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back.audit(0, "olga", 10).len(), 1, "the audit log travels in snapshots");
    }

    #[test]
    fn notes_are_kept_when_their_write_takes_effect_and_travel_in_snapshots() {
        let mut s = Store::new(100);
        let noted = |message: &str, cmd: Command| Command::Recorded {
            notes: vec![eventlog::Note {
                object: "model/a".into(),
                reason: "RolloutStep".into(),
                message: message.into(),
                by: "controller/model".into(),
                at_ms: 7,
            }],
            command: Box::new(cmd),
        };
        s.apply(&noted("first", put("a", 1, None)));
        s.apply(&noted("lost a race", put("a", 2, Some(9)))); // a failed compare: no event
        s.apply(&noted("second", put("a", 3, Some(1))));
        let got: Vec<_> = s.events_since(0, "model/a", 10).into_iter().map(|e| (e.revision, e.note.message)).collect();
        assert_eq!(got, [(1, "first".to_string()), (2, "second".to_string())]);
        let back: Store = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back.events_since(0, "", 10).len(), 2, "the event log travels in snapshots");
    }

    fn txn_put(name: &str, replicas: u32) -> TxnOp {
        TxnOp::Put {
            key: key(name),
            uid: format!("uid-{name}"),
            labels: BTreeMap::new(),
            spec: json!({ "replicas": replicas }),
            status: Some(json!({"phase": "Pending"})),
        }
    }

    #[test]
    fn txn_is_all_or_nothing() {
        let mut s = Store::new(100);
        s.apply(&put("node", 1, None));
        let ok = Command::Txn {
            compares: vec![Compare { key: key("node"), revision: 1 }, Compare { key: key("r1"), revision: 0 }],
            ops: vec![txn_put("r1", 1), TxnOp::PutStatus { key: key("node"), status: json!({"alloc": [0]}) }],
        };
        assert_eq!(s.apply(&ok), CommandResult::Txn { revision: 3 });
        assert_eq!(s.get(&key("r1")).unwrap().status, json!({"phase": "Pending"}));
        // The same binding again: the node's revision moved, so nothing happens.
        let before = s.clone();
        let again =
            Command::Txn { compares: vec![Compare { key: key("node"), revision: 1 }], ops: vec![txn_put("r2", 1)] };
        assert!(matches!(s.apply(&again), CommandResult::Conflict { actual: 3, .. }));
        // An op on a missing object fails the whole transaction.
        let missing = Command::Txn {
            compares: vec![],
            ops: vec![txn_put("r3", 1), TxnOp::PutStatus { key: key("ghost"), status: json!({}) }],
        };
        assert!(matches!(s.apply(&missing), CommandResult::NotFound { .. }));
        assert_eq!(s, before);
        // Delete then re-create in one transaction is allowed; delete of a deleted key is not.
        let recreate = Command::Txn { compares: vec![], ops: vec![TxnOp::Delete { key: key("r1") }, txn_put("r1", 2)] };
        assert!(matches!(s.apply(&recreate), CommandResult::Txn { revision: 5 }));
        let twice = Command::Txn {
            compares: vec![],
            ops: vec![TxnOp::Delete { key: key("r1") }, TxnOp::Delete { key: key("r1") }],
        };
        assert!(matches!(s.apply(&twice), CommandResult::NotFound { .. }));
    }

    #[test]
    fn batch_applies_each_command_in_order_with_its_own_result() {
        let mut s = Store::new(100);
        let batch = Command::Batch(vec![put("a", 1, None), put("a", 2, Some(7)), put("b", 1, None)]);
        let CommandResult::Batch(results) = s.apply(&batch) else { panic!("not a batch result") };
        assert!(matches!(results[0], CommandResult::Put { created: true, .. }));
        assert!(matches!(results[1], CommandResult::Conflict { expected: 7, actual: 1, .. }));
        assert!(matches!(&results[2], CommandResult::Put { object, .. } if object.revision == 2));
    }

    #[test]
    fn status_updates_need_an_object() {
        let mut s = Store::new(10);
        let st = Command::PutStatus { key: key("a"), status: json!({"ready": 1}), expected_revision: None };
        assert!(matches!(s.apply(&st), CommandResult::NotFound { .. }));
        s.apply(&put("a", 1, None));
        let CommandResult::Put { object, .. } = s.apply(&st) else { panic!() };
        assert_eq!(object.status, json!({"ready": 1}));
        assert_eq!(object.spec, json!({"replicas": 1}));
    }
}
