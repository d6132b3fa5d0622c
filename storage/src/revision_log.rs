//! What the audit log and the event log share: entries kept in store-revision order, bounded
//! to the newest `kept`, and read from a revision on (inclusive: several entries may share a
//! revision, and none may be skipped), the newest `limit` when more match.
use std::collections::VecDeque;

/// Appends `entry`, dropping the oldest beyond `kept`.
pub(crate) fn push<T>(entries: &mut VecDeque<T>, entry: T, kept: usize) {
    entries.push_back(entry);
    while entries.len() > kept {
        entries.pop_front();
    }
}

/// Entries at or after revision `since` that `keep` accepts, oldest first, at most `limit`
/// of them: the newest when more match.
pub(crate) fn query<T: Clone>(
    entries: &VecDeque<T>,
    since: u64,
    revision: impl Fn(&T) -> u64,
    keep: impl Fn(&T) -> bool,
    limit: usize,
) -> Vec<T> {
    let start = entries.partition_point(|e| revision(e) < since);
    let matching: Vec<&T> = entries.range(start..).filter(|e| keep(e)).collect();
    let skip = matching.len().saturating_sub(limit);
    matching.into_iter().skip(skip).cloned().collect()
}
