//! Checks that what chaos clients observed of the object store is linearizable, and that no
//! acknowledged write was lost.
//!
//! # The history
//!
//! Each client records every op it sends as an [`Op`]: the key, the [`Call`], the answer
//! ([`Ret`]), and the times it was invoked and answered, from one monotonic clock. An op that
//! got no answer (timeout, connection lost, `UNAVAILABLE` after sending) is *indeterminate*:
//! `complete: None`; it may have taken effect at any time after its invocation, or never.
//! Indeterminate reads tell nothing and are dropped.
//!
//! # The model
//!
//! Each key is an independent register holding `(value, revision)` or nothing. The store's
//! revision is one global counter, so per key revisions strictly grow (with gaps):
//! - a read returns exactly what the last linearized write put there, revision included;
//! - a write or successful CAS returns a revision above every revision taken before it
//!   (a delete takes none, and whether deletes bump the counter is not assumed);
//! - a CAS succeeds iff the current revision equals `expected_revision` (0 = absent), and
//!   answers [`Ret::CasConflict`] iff it differs;
//! - a write with no answer took *some* revision above the ones before it: the model keeps it
//!   unknown until a read or CAS pins it down (see `linearizability/model.rs`).
//!
//! # The algorithm
//!
//! ```text
//!  history ─▶ split by key ─▶ validate ─▶ pre-checks ─▶ search without ─▶ full search
//!                                          (no search)   unread unanswered
//!                                                        writes (quick)
//! ```
//!
//! Linearizability is compositional (Herlihy & Wing's locality; Porcupine's
//! P-compositionality): a history is linearizable iff each key's sub-history is, so [`check`]
//! splits the history by key and checks each alone (`linearizability/report.rs`):
//!
//! 1. **Pre-checks** (`linearizability/precheck.rs`) catch the common bugs in near-linear time
//!    and name them: two writes acknowledged with one revision, a read of a value no write
//!    produced, and an op that began after revision `m` was acknowledged or read yet saw, took
//!    or expected an older one (stale read, revision going backwards, lost write). Each is a
//!    proof of non-linearizability, so no search follows.
//! 2. **The search** (`linearizability/search.rs`) is Wing & Gong's, with Lowe's memoization,
//!    over Porcupine's event list: depth-first, it repeatedly places a *minimal* pending op
//!    (invoked before every pending op returned), applies it to the model, and backtracks when
//!    an op has returned but cannot be placed; explored (placed ops, model state) pairs are not
//!    explored again.
//! 3. **Indeterminate ops** complete at +infinity: they never force a backtrack, may be placed
//!    anywhere after their invocation, and need not be placed at all; the search succeeds once
//!    every *answered* op is placed. Since each can go almost anywhere, they are what makes the
//!    search expensive, so it tries them only where no answered op fits, tries one of several
//!    identical ones, and only places one where the next op needs it (an order where nothing
//!    observes it is dominated by the same order without it, or with it moved later). Before
//!    the full search, a quick pass leaves out the unanswered writes whose values no read
//!    returned: any linearization it finds is one of the whole history (they never happened);
//!    if it finds none, the full search decides.
//! 4. **A step budget** ([`CheckConfig::max_steps_per_key`]) bounds each key; one that exhausts
//!    it is reported as [`Anomaly::Unknown`] (with what the quick pass found, if anything)
//!    rather than hanging the harness. As a guide, a key with a few hundred ops from 8 clients,
//!    a fifth of them unanswered, checks in tens of milliseconds in a debug build; thousands
//!    of ops on one key with dozens of unanswered writes can exhaust the budget: spread the
//!    workload over more keys.
//!
//! When a key is not linearizable, the report shows the deepest point the search reached: the
//! register's content there, the op that put it there, and each op that could have come next
//! with the reason it cannot.
//!
//! [`lost_writes`] is a separate, simpler check that needs no search: an acknowledged write
//! must not vanish from reads that begin after it returned (`linearizability/lost.rs`).

mod lost;
mod model;
mod precheck;
mod report;
mod search;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_random;
#[cfg(test)]
mod tests_reference;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use lost::{lost_writes, LostWrite};

/// One operation a client performed on one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Which client issued it (for reports; the checker does not assume clients are sequential).
    pub client: u32,
    pub key: String,
    pub call: Call,
    /// The answer; ignored when `complete` is `None`, where [`Ret::Indeterminate`] is customary.
    pub ret: Ret,
    /// When the op was sent, in ticks of a clock shared by all clients (e.g. ns since start).
    pub invoke: u64,
    /// When the answer arrived; `None` when none did (the op may or may not have happened).
    pub complete: Option<u64>,
}

/// What a client asked the store to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    Read,
    /// Unconditional put.
    Write {
        value: String,
    },
    /// Put only if the key's revision is `expected_revision` (0: only if the key is absent).
    Cas {
        expected_revision: u64,
        value: String,
    },
    Delete,
}

/// What the store answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ret {
    /// Answer to [`Call::Read`]: the value and its revision, or `None` if the key is absent.
    Read(Option<Versioned>),
    /// Answer to [`Call::Write`]: the new revision.
    Written(u64),
    /// Answer to [`Call::Cas`] that succeeded: the new revision.
    CasOk(u64),
    /// Answer to [`Call::Cas`] refused because the current revision differs; nothing written.
    CasConflict,
    /// Answer to [`Call::Delete`].
    Deleted,
    /// No answer (pair with `complete: None`).
    Indeterminate,
}

/// A value with the revision it was written at.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Versioned {
    pub value: String,
    pub revision: u64,
}

impl Op {
    /// Whether the op got no answer and so may have happened at any time after `invoke`, or not.
    pub fn is_indeterminate(&self) -> bool {
        self.complete.is_none()
    }

    /// The value and revision this op put in place, if it is an acknowledged write or CAS.
    pub fn acknowledged_write(&self) -> Option<Versioned> {
        match (&self.call, &self.ret, self.complete) {
            (Call::Write { value }, Ret::Written(revision), Some(_))
            | (Call::Cas { value, .. }, Ret::CasOk(revision), Some(_)) => {
                Some(Versioned { value: value.clone(), revision: *revision })
            }
            _ => None,
        }
    }
}

/// An op together with its position in the checked history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedOp {
    pub index: usize,
    pub op: Op,
}

/// Limits for [`check_with`].
#[derive(Clone, Debug)]
pub struct CheckConfig {
    /// Model steps (one try of one op at one point) the search of one key may take before the
    /// key is reported [`Anomaly::Unknown`]. Memory grows with the explored states, at most one
    /// per step.
    pub max_steps_per_key: u64,
    /// Most ops shown in one anomaly's slice of the history.
    pub max_ops_per_anomaly: usize,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig { max_steps_per_key: 10_000_000, max_ops_per_anomaly: 16 }
    }
}

/// The outcome of [`check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// True iff every key was shown linearizable (no anomaly of any kind).
    pub ok: bool,
    pub keys_checked: usize,
    /// Ops considered, after dropping reads that got no answer.
    pub ops_checked: usize,
    pub anomalies: Vec<Anomaly>,
}

/// Something wrong with one key's sub-history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Anomaly {
    /// No order of the ops is consistent with the register and with real time.
    NotLinearizable {
        key: String,
        /// Why, in a few lines: the deepest consistent prefix and why nothing can follow it.
        explanation: String,
        /// The ops the explanation refers to, ordered by invocation.
        ops: Vec<IndexedOp>,
    },
    /// The search ran out of budget; the key is neither shown linearizable nor not.
    Unknown { key: String, reason: String },
    /// The ops cannot be checked as recorded (an answer that does not fit the call, a
    /// completion before the invocation); a harness bug, not a store bug.
    Malformed { key: String, reason: String, ops: Vec<IndexedOp> },
}

impl Anomaly {
    pub fn key(&self) -> &str {
        match self {
            Anomaly::NotLinearizable { key, .. } | Anomaly::Unknown { key, .. } | Anomaly::Malformed { key, .. } => key,
        }
    }

    /// Whether this anomaly proves the store misbehaved (as opposed to an inconclusive check).
    pub fn is_violation(&self) -> bool {
        matches!(self, Anomaly::NotLinearizable { .. })
    }
}

/// Checks `history` with the default [`CheckConfig`].
pub fn check(history: &[Op]) -> CheckResult {
    check_with(history, &CheckConfig::default())
}

/// Checks that each key's sub-history of `history` is linearizable with respect to the
/// register model (see the module docs); keys are checked and reported in sorted order.
pub fn check_with(history: &[Op], config: &CheckConfig) -> CheckResult {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, op) in history.iter().enumerate() {
        if !(op.is_indeterminate() && op.call == Call::Read) {
            by_key.entry(op.key.as_str()).or_default().push(index);
        }
    }
    let mut result = CheckResult {
        ok: true,
        keys_checked: by_key.len(),
        ops_checked: by_key.values().map(Vec::len).sum(),
        anomalies: Vec::new(),
    };
    for (key, indices) in by_key {
        result.anomalies.extend(report::check_key(key, history, &indices, config));
    }
    result.ok = result.anomalies.is_empty();
    result
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Read => write!(f, "read"),
            Call::Write { value } => write!(f, "write {value:?}"),
            Call::Cas { expected_revision: 0, value } => write!(f, "cas {value:?} if absent"),
            Call::Cas { expected_revision, value } => write!(f, "cas {value:?} if @{expected_revision}"),
            Call::Delete => write!(f, "delete"),
        }
    }
}

impl fmt::Display for Ret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ret::Read(Some(v)) => write!(f, "{v}"),
            Ret::Read(None) => write!(f, "absent"),
            Ret::Written(revision) => write!(f, "@{revision}"),
            Ret::CasOk(revision) => write!(f, "ok @{revision}"),
            Ret::CasConflict => write!(f, "conflict"),
            Ret::Deleted => write!(f, "ok"),
            Ret::Indeterminate => write!(f, "?"),
        }
    }
}

impl fmt::Display for Versioned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}@{}", self.value, self.revision)
    }
}

/// `client 3 [40, 50] read -> "a"@1`; an op with no answer shows as `[40, ?) write "x" -> ?`.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.complete {
            Some(complete) => {
                write!(f, "client {} [{}, {}] {} -> {}", self.client, self.invoke, complete, self.call, self.ret)
            }
            None => write!(f, "client {} [{}, ?) {} -> ? (no answer)", self.client, self.invoke, self.call),
        }
    }
}

impl fmt::Display for IndexedOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {}", self.index, self.op)
    }
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::NotLinearizable { key, explanation, ops } => {
                writeln!(f, "key {key:?} is not linearizable: {explanation}")?;
                writeln!(f, "  ops involved:")?;
                ops.iter().try_for_each(|op| writeln!(f, "    {op}"))
            }
            Anomaly::Unknown { key, reason } => writeln!(f, "key {key:?} could not be checked: {reason}"),
            Anomaly::Malformed { key, reason, ops } => {
                writeln!(f, "key {key:?} has a malformed history: {reason}")?;
                ops.iter().try_for_each(|op| writeln!(f, "    {op}"))
            }
        }
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.ok { "linearizable" } else { "NOT shown linearizable" };
        let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        writeln!(
            f,
            "{verdict}: {} on {}, {}",
            plural(self.ops_checked, "op", "ops"),
            plural(self.keys_checked, "key", "keys"),
            plural(self.anomalies.len(), "anomaly", "anomalies")
        )?;
        self.anomalies.iter().try_for_each(|a| write!(f, "{a}"))
    }
}
