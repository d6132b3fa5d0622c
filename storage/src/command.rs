//! The commands replicated through the Raft log, and their results.
use std::collections::BTreeMap;

use flotilla_api::{ObjectKey, StoredObject};
use serde::{Deserialize, Serialize};

/// One state change, proposed by the leader and applied by every state machine in log
/// order. Applying is deterministic: everything random (uids) is chosen by the proposer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Create or update an object's spec and labels.
    Put {
        key: ObjectKey,
        /// Used only when this creates the object.
        uid: String,
        labels: BTreeMap<String, String>,
        spec: serde_json::Value,
        /// Compare-and-set: apply only if the current revision equals this (0: absent).
        expected_revision: Option<u64>,
    },
    /// Replace an object's status (controllers only).
    PutStatus {
        key: ObjectKey,
        status: serde_json::Value,
        expected_revision: Option<u64>,
    },
    Delete {
        key: ObjectKey,
        expected_revision: Option<u64>,
    },
    /// All-or-nothing: if every compare holds, apply every op in order; else nothing.
    /// Controllers use it to bind a replica and allocate its GPUs in one step.
    Txn {
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    },
    /// Independent commands proposed as one log entry (write batching); each has its own
    /// result, in order.
    Batch(Vec<Command>),
    /// `command`, applied at most once for request `id`: a repeat of an id that already
    /// changed state answers with that first result instead of applying again
    /// (`crate::applied`). The proposer picks the id (random, 128 bits) and keeps it
    /// across its retries.
    Once {
        id: u128,
        command: Box<Command>,
    },
    /// `command`, made through the API by `caller`: applied as is, and recorded in the
    /// audit log with its outcome (`crate::audit`).
    Audited {
        caller: crate::audit::Caller,
        command: Box<Command>,
    },
    /// `command`, made by a controller, with notes that explain it: applied as is, and the
    /// notes kept in the event log at its revision when it took effect (`crate::eventlog`).
    Recorded {
        notes: Vec<crate::eventlog::Note>,
        command: Box<Command>,
    },
}

impl Command {
    /// The one object a single-object command writes.
    pub fn key(&self) -> Option<&ObjectKey> {
        match self {
            Command::Put { key, .. } | Command::PutStatus { key, .. } | Command::Delete { key, .. } => Some(key),
            Command::Audited { command, .. } | Command::Recorded { command, .. } => command.key(),
            Command::Txn { .. } | Command::Batch(_) | Command::Once { .. } => None,
        }
    }
}

/// A transaction condition: the object's current revision must be `revision` (0: absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: ObjectKey,
    pub revision: u64,
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Create or update the spec and labels, and the status too when given.
    Put {
        key: ObjectKey,
        uid: String,
        labels: BTreeMap<String, String>,
        spec: serde_json::Value,
        status: Option<serde_json::Value>,
    },
    /// Replace the status of an object that exists.
    PutStatus { key: ObjectKey, status: serde_json::Value },
    /// Remove an object that exists.
    Delete { key: ObjectKey },
}

impl TxnOp {
    pub fn key(&self) -> &ObjectKey {
        match self {
            TxnOp::Put { key, .. } | TxnOp::PutStatus { key, .. } | TxnOp::Delete { key } => key,
        }
    }
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    /// A blank or membership entry: nothing for the client.
    None,
    Put {
        object: StoredObject,
        created: bool,
        /// The object already had exactly this spec/labels/status; no new revision.
        unchanged: bool,
    },
    Deleted {
        object: StoredObject,
        revision: u64,
    },
    /// The compare-and-set failed; `actual` is 0 if the object does not exist.
    Conflict {
        key: ObjectKey,
        expected: u64,
        actual: u64,
    },
    NotFound {
        key: ObjectKey,
    },
    /// A transaction applied; the store revision after it.
    Txn {
        revision: u64,
    },
    Batch(Vec<CommandResult>),
    /// A repeat of a request that took effect at store revision `revision`, whose result
    /// can no longer be rebuilt (the object changed since and the watch history no longer
    /// reaches back to it).
    AlreadyApplied {
        revision: u64,
    },
}
