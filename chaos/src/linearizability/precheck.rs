//! Violations that need no search. Each is a sound shortcut (the search would fail too), found
//! in near-linear time, and explained in the terms of the bug it usually is:
//! - two writes acknowledged with one revision;
//! - a read of a `(value, revision)` no write produced;
//! - an op that began after revision `m` was acknowledged or read, yet saw, took or expected a
//!   lower one: a stale read, a revision going backwards, or a lost write.

use std::collections::HashMap;

use super::{Call, Op, Ret};

/// The violations in the ops of `history` at `indices`, each as an explanation and the history
/// indices it cites (most important first).
pub(super) fn violations(history: &[Op], indices: &[usize]) -> Vec<(String, Vec<usize>)> {
    let mut found = Vec::new();
    let acked = duplicate_revisions(history, indices, &mut found);
    unwritten_reads(history, indices, &acked, &mut found);
    if let Some(stale) = older_than_known(history, indices, &acked) {
        found.push(stale);
    }
    found
}

/// Reports writes acknowledged with a revision already acknowledged; returns, for each
/// acknowledged revision, the first op acknowledged with it.
fn duplicate_revisions(
    history: &[Op],
    indices: &[usize],
    found: &mut Vec<(String, Vec<usize>)>,
) -> HashMap<u64, usize> {
    let mut acked: HashMap<u64, usize> = HashMap::new();
    for &i in indices {
        let Some(w) = history[i].acknowledged_write() else { continue };
        match acked.get(&w.revision) {
            Some(&first) => found.push((
                format!(
                    "#{first} and #{i} were both acknowledged with revision {}, but every write takes a new revision",
                    w.revision
                ),
                vec![first, i],
            )),
            None => {
                acked.insert(w.revision, i);
            }
        }
    }
    acked
}

/// Reports reads of a `(value, revision)` that no acknowledged write produced, when no write
/// that went unanswered wrote that value either.
fn unwritten_reads(
    history: &[Op],
    indices: &[usize],
    acked: &HashMap<u64, usize>,
    found: &mut Vec<(String, Vec<usize>)>,
) {
    let unanswered_write_of = |value: &str| {
        indices.iter().any(|&i| {
            let op = &history[i];
            op.is_indeterminate()
                && matches!(&op.call, Call::Write { value: v } | Call::Cas { value: v, .. } if v == value)
        })
    };
    for &i in indices {
        let (Call::Read, Ret::Read(Some(seen)), Some(_)) = (&history[i].call, &history[i].ret, history[i].complete)
        else {
            continue;
        };
        let writer = acked.get(&seen.revision).copied();
        if writer.is_some_and(|w| history[w].acknowledged_write().as_ref() == Some(seen))
            || unanswered_write_of(&seen.value)
        {
            continue;
        }
        let mut ops = vec![i];
        let detail = match writer {
            Some(w) => {
                ops.push(w);
                format!("revision {} was acknowledged to #{w} for another value", seen.revision)
            }
            None => "no write or CAS of this key was acknowledged with that revision".to_string(),
        };
        found.push((
            format!(
                "#{i} read {seen}, which no write produced: {detail}, and no write that went unanswered wrote {:?}",
                seen.value
            ),
            ops,
        ));
    }
}

/// The revision an answered op proves the key had reached by the time it returned.
fn reached(op: &Op) -> Option<u64> {
    match (&op.call, &op.ret) {
        (Call::Read, Ret::Read(Some(seen))) => Some(seen.revision),
        (Call::Write { .. }, Ret::Written(rev)) | (Call::Cas { .. }, Ret::CasOk(rev)) => Some(*rev),
        _ => None,
    }
}

/// Finds answered ops that began after the key reached revision `m` (an op returned having
/// read or taken `m`) yet read a lower revision, took a lower one, or succeeded expecting a
/// lower one. Revisions only grow (after a delete, new writes still take higher ones), so each
/// is impossible. Reports the earliest such op, and counts the rest.
fn older_than_known(history: &[Op], indices: &[usize], acked: &HashMap<u64, usize>) -> Option<(String, Vec<usize>)> {
    let mut marks: Vec<(u64, u64, usize)> =
        indices.iter().filter_map(|&i| Some((history[i].complete?, reached(&history[i])?, i))).collect();
    marks.sort_unstable();
    let mut subjects: Vec<usize> = indices.iter().copied().filter(|&i| history[i].complete.is_some()).collect();
    subjects.sort_by_key(|&i| (history[i].invoke, i));

    let mut next_mark = 0;
    let mut known: Option<(u64, usize)> = None; // highest revision reached, and by which op
    let mut offenders: Vec<(usize, usize, String)> = Vec::new();
    for i in subjects {
        let op = &history[i];
        while next_mark < marks.len() && marks[next_mark].0 < op.invoke {
            let (_, rev, by) = marks[next_mark];
            if known.is_none_or(|(k, _)| rev > k) {
                known = Some((rev, by));
            }
            next_mark += 1;
        }
        let Some((floor, by)) = known else { continue };
        let what = match (&op.call, &op.ret) {
            (Call::Read, Ret::Read(Some(seen))) if seen.revision < floor => format!("read {seen}"),
            (Call::Cas { expected_revision: e, .. }, Ret::CasOk(_)) if *e != 0 && *e < floor => {
                format!("succeeded expecting revision {e}")
            }
            (Call::Write { .. }, Ret::Written(rev)) | (Call::Cas { .. }, Ret::CasOk(rev)) if *rev < floor => {
                format!("was acknowledged with revision {rev}")
            }
            _ => continue,
        };
        offenders.push((i, by, what));
    }

    let (i, by, what) = offenders.first()?;
    let (done, floor) = (history[*by].complete.unwrap_or_default(), reached(&history[*by]).unwrap_or_default());
    let how = match history[*by].call {
        Call::Read => "had read",
        _ => "had been acknowledged with",
    };
    let mut text = format!(
        "#{i} {what}, but #{by} {how} revision {floor} at {done}, before #{i} began at {}: revisions only grow, \
         so an op begun later cannot see, take or expect an older one (a stale read, a revision going backwards, \
         or a lost write)",
        history[*i].invoke
    );
    let mut ops = vec![*i, *by];
    // For a stale read, the write whose value it saw.
    if let Ret::Read(Some(seen)) = &history[*i].ret {
        if let Some(&w) = acked.get(&seen.revision) {
            ops.push(w);
        }
    }
    if offenders.len() > 1 {
        let more: Vec<String> = offenders[1..].iter().take(8).map(|(j, _, _)| format!("#{j}")).collect();
        let ellipsis = if offenders.len() > 9 { ", ..." } else { "" };
        text.push_str(&format!(
            "; {} more ops begun later did the same: {}{ellipsis}",
            offenders.len() - 1,
            more.join(", ")
        ));
        ops.extend(offenders[1..].iter().map(|(j, _, _)| *j));
    }
    Some((text, ops))
}
