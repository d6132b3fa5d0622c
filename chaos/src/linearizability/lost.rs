//! The lost-write check: simpler than linearizability and needing no search, so it still
//! speaks when the search gives up, and it names the failure the way an operator would.
//!
//! A write or CAS acknowledged with revision `r` must survive: a read invoked after the
//! acknowledgement must see revision `r` or a later one (revisions only grow), or find the key
//! absent only if some delete could have happened in between. The harness ends every run with
//! a read of each key after healing the cluster, so every acknowledged write meets such a read.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Call, IndexedOp, Op, Ret};

/// An acknowledged write that a later read shows was lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostWrite {
    pub key: String,
    /// The acknowledged write or CAS.
    pub write: IndexedOp,
    /// The first read, invoked after the write was acknowledged, that does not reflect it.
    pub read: IndexedOp,
    pub explanation: String,
}

/// Finds acknowledged writes that reads invoked after their acknowledgement do not reflect;
/// at most one finding (the earliest such read) per write, ordered by key then history index.
pub fn lost_writes(history: &[Op]) -> Vec<LostWrite> {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, op) in history.iter().enumerate() {
        by_key.entry(op.key.as_str()).or_default().push(index);
    }
    let mut lost = Vec::new();
    for (key, indices) in by_key {
        let mut reads: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| {
                matches!((&history[i].call, &history[i].ret, history[i].complete), (Call::Read, Ret::Read(_), Some(_)))
            })
            .collect();
        reads.sort_by_key(|&i| (history[i].invoke, i));
        let deletes: Vec<&Op> = indices.iter().map(|&i| &history[i]).filter(|op| op.call == Call::Delete).collect();

        for &w in &indices {
            let write = &history[w];
            let (Some(acked), Some(acked_at)) = (write.acknowledged_write(), write.complete) else { continue };
            // A delete that may fall between the write and the read: not over before the write
            // began, and begun by the time the read ended (equal times count as concurrent).
            let deleted_between = |read: &Op| {
                deletes.iter().any(|d| {
                    d.invoke <= read.complete.unwrap_or(u64::MAX) && d.complete.is_none_or(|c| c >= write.invoke)
                })
            };
            let finding = reads.iter().copied().filter(|&r| history[r].invoke > acked_at).find_map(|r| {
                let read = &history[r];
                let Ret::Read(seen) = &read.ret else { return None };
                let what = match seen {
                    Some(seen) if seen.revision < acked.revision => format!("read {seen}, an older revision"),
                    None if !deleted_between(read) => {
                        "found the key absent, and no delete could have happened in between".to_string()
                    }
                    _ => return None,
                };
                Some((r, what))
            });
            if let Some((r, what)) = finding {
                lost.push(LostWrite {
                    key: key.to_string(),
                    write: IndexedOp { index: w, op: write.clone() },
                    read: IndexedOp { index: r, op: history[r].clone() },
                    explanation: format!(
                        "#{w} put {acked} and was acknowledged at {acked_at}; #{r}, invoked later at {}, {what}",
                        history[r].invoke
                    ),
                });
            }
        }
    }
    lost
}

impl fmt::Display for LostWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "key {:?}: acknowledged write lost: {}", self.key, self.explanation)?;
        writeln!(f, "    {}", self.write)?;
        writeln!(f, "    {}", self.read)
    }
}
