//! Exactly-once writes: the state machine remembers the ids of the last requests that
//! changed state, with what they did, so a request proposed twice takes effect once.
//!
//! Why: a server forwards a write to the leader and retries it when the leader goes away
//! mid-call (a crash, a partition, a step-down). The first attempt may already have been
//! committed by then — the new leader holds it — and re-applying it is wrong both ways: a
//! compare-and-set that succeeded would answer a *conflict* (a definite "not applied" that
//! is false: the chaos harness caught a read of a value whose CAS was answered as a
//! conflict) and a blind write would take effect twice. With an id carried across
//! retries ([`crate::Command::Once`]), the second apply finds the first one's record and
//! answers with its result instead (Raft dissertation §6.3, client sessions, minus the
//! per-client state).
//!
//! Only outcomes that changed state are recorded: a conflict or a not-found changed
//! nothing, so running the request again is the same as running it for the first time.
//!
//! The record is part of the replicated state and must be identical on every server: it
//! is bounded by a fixed count ([`KEPT`]), never by a setting, and travels in snapshots.
//! A record is compact (no object): the answer to a repeat is rebuilt from the current
//! object or the watch history ([`crate::Store`]), which is the only part that may differ
//! between servers, and when neither reaches back it is
//! [`crate::CommandResult::AlreadyApplied`].
use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How many applied requests are remembered. At the write rate of the store benchmark
/// (about 8k/s on 2 cores) this reaches back 4 s, well past a forward's retry after an
/// election; at a control plane's usual rate, minutes.
pub const KEPT: usize = 32_768;

/// What an applied request did: enough to rebuild its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Put an object, which now has `revision`.
    Put { revision: u64, created: bool },
    /// Deleted an object at store revision `revision`.
    Deleted { revision: u64 },
    /// A transaction applied; the store revision after it.
    Txn { revision: u64 },
}

/// The remembered requests, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppliedRequests {
    order: VecDeque<(u128, Outcome)>,
    index: HashMap<u128, Outcome>,
}

impl AppliedRequests {
    pub fn get(&self, id: u128) -> Option<Outcome> {
        self.index.get(&id).copied()
    }

    /// Remembers `id`, forgetting the oldest past [`KEPT`].
    pub fn insert(&mut self, id: u128, outcome: Outcome) {
        if self.index.insert(id, outcome).is_none() {
            self.order.push_back((id, outcome));
        }
        while self.order.len() > KEPT {
            if let Some((old, _)) = self.order.pop_front() {
                self.index.remove(&old);
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.order.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// On the wire (snapshots) it is the ordered list; the index is rebuilt on load.
impl Serialize for AppliedRequests {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.order.iter())
    }
}

impl<'de> Deserialize<'de> for AppliedRequests {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<(u128, Outcome)>::deserialize(d)?;
        let mut out = AppliedRequests::default();
        for (id, outcome) in list {
            out.insert(id, outcome);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_are_forgotten_past_the_bound_and_a_snapshot_round_trips() {
        let mut a = AppliedRequests::default();
        for id in 0..(KEPT as u128 + 3) {
            a.insert(id, Outcome::Txn { revision: id as u64 });
        }
        assert_eq!(a.len(), KEPT);
        assert_eq!(a.get(2), None, "the three oldest are gone");
        assert_eq!(a.get(3), Some(Outcome::Txn { revision: 3 }));
        let json = serde_json::to_vec(&a).unwrap();
        let back: AppliedRequests = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, a);
        let big = u128::MAX - 1;
        a.insert(big, Outcome::Deleted { revision: 9 });
        let back: AppliedRequests = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!(back.get(big), Some(Outcome::Deleted { revision: 9 }), "a full 128-bit id survives JSON");
    }
}
