//! Checks one key's sub-history end to end and turns what went wrong into an [`Anomaly`] a
//! human can read: validation, cheap sound pre-checks with pointed explanations, the search,
//! and the explanation of the search's deepest dead end.

use std::collections::{HashMap, HashSet};

use super::model::{apply, CasOutcome, Reject, ShowState, Step};
use super::precheck;
use super::search::{search, Frontier, Outcome, SearchOp};
use super::{Anomaly, Call, CheckConfig, IndexedOp, Op, Ret};

/// Checks the ops of `history` at `indices` (all on `key`); empty when linearizable.
pub(super) fn check_key(key: &str, history: &[Op], indices: &[usize], config: &CheckConfig) -> Vec<Anomaly> {
    let slice = |picked: &mut dyn Iterator<Item = usize>| -> Vec<IndexedOp> {
        // `picked` comes most important first: dedup, keep the first few, show in time order.
        let mut seen = HashSet::new();
        let mut ops: Vec<IndexedOp> = picked
            .filter(|index| seen.insert(*index))
            .take(config.max_ops_per_anomaly)
            .map(|index| IndexedOp { index, op: history[index].clone() })
            .collect();
        ops.sort_by_key(|o| (o.op.invoke, o.index));
        ops
    };

    let bad: Vec<(usize, &str)> = indices.iter().filter_map(|&i| malformed(&history[i]).map(|why| (i, why))).collect();
    if let Some((_, why)) = bad.first() {
        let reason = format!("{} op(s) cannot be checked; first: {why}", bad.len());
        return vec![Anomaly::Malformed { key: key.into(), reason, ops: slice(&mut bad.iter().map(|(i, _)| *i)) }];
    }

    let violations = precheck::violations(history, indices);
    if !violations.is_empty() {
        return violations
            .into_iter()
            .map(|(explanation, ops)| Anomaly::NotLinearizable {
                key: key.into(),
                explanation,
                ops: slice(&mut ops.into_iter()),
            })
            .collect();
    }

    let full = Compiled::new(history, indices);
    let budget = config.max_steps_per_key;
    let (mut spent, mut hint) = (0, None);
    if let Some(reduced) = full.without_unread_writes() {
        // A quick first pass: a linearization that leaves out unanswered writes nobody read is
        // a linearization of the whole (they simply never happened). A failure proves nothing.
        let (outcome, steps) = search(&reduced.ops, budget / 2);
        spent = steps;
        match outcome {
            Outcome::Linearizable => return Vec::new(),
            Outcome::Violation(frontier) => {
                hint = Some(explain(&reduced, history, &frontier, config.max_ops_per_anomaly))
            }
            Outcome::Exhausted => {}
        }
    }
    let (outcome, steps) = search(&full.ops, budget - spent);
    match outcome {
        Outcome::Linearizable => Vec::new(),
        Outcome::Violation(frontier) => {
            let (explanation, picked) = explain(&full, history, &frontier, config.max_ops_per_anomaly);
            vec![Anomaly::NotLinearizable { key: key.into(), explanation, ops: slice(&mut picked.into_iter()) }]
        }
        Outcome::Exhausted => {
            let unanswered = full.ops.iter().filter(|op| op.complete.is_none()).count();
            let mut reason = format!(
                "search gave up after {} model steps over {} ops ({unanswered} unanswered); raise \
                 max_steps_per_key, or record fewer concurrent or unanswered ops per key",
                spent + steps,
                full.ops.len(),
            );
            if let Some((explanation, _)) = hint {
                reason.push_str(&format!(
                    ". Leaving out the unanswered writes whose values no read returned, there is no linearization: \
                     {explanation}"
                ));
            }
            vec![Anomaly::Unknown { key: key.into(), reason }]
        }
    }
}

/// Why `op` cannot be checked as recorded, if it cannot.
fn malformed(op: &Op) -> Option<&'static str> {
    let complete = op.complete?;
    if complete < op.invoke {
        return Some("it completes before it is invoked");
    }
    match (&op.call, &op.ret) {
        (_, Ret::Indeterminate) => Some("it has a completion time but no answer (use complete: None)"),
        (Call::Read, Ret::Read(_))
        | (Call::Write { .. }, Ret::Written(_))
        | (Call::Cas { .. }, Ret::CasOk(_) | Ret::CasConflict)
        | (Call::Delete, Ret::Deleted) => None,
        _ => Some("its answer does not fit its call"),
    }
}

/// A key's ops compiled for the model, with the interned values.
#[derive(Clone)]
struct Compiled {
    ops: Vec<SearchOp>,
    /// The history index of each op.
    indices: Vec<usize>,
    values: Vec<String>,
}

impl Compiled {
    fn new(history: &[Op], indices: &[usize]) -> Self {
        let mut ids: HashMap<String, u32> = HashMap::new();
        let mut values = Vec::new();
        let mut intern = |value: &str| -> u32 {
            *ids.entry(value.to_string()).or_insert_with(|| {
                values.push(value.to_string());
                u32::try_from(values.len() - 1).expect("fewer than 2^32 distinct values per key")
            })
        };
        let ops = indices
            .iter()
            .map(|&i| {
                let op = &history[i];
                let answered = op.complete.is_some();
                let step = match (&op.call, &op.ret) {
                    (Call::Read, Ret::Read(seen)) => Step::Read(seen.as_ref().map(|v| (intern(&v.value), v.revision))),
                    (Call::Write { value }, ret) => {
                        let revision = match ret {
                            Ret::Written(rev) if answered => Some(*rev),
                            _ => None,
                        };
                        Step::Write { value: intern(value), revision }
                    }
                    (Call::Cas { expected_revision, value }, ret) => {
                        let outcome = match ret {
                            _ if !answered => CasOutcome::Unknown,
                            Ret::CasOk(rev) => CasOutcome::Ok(*rev),
                            _ => CasOutcome::Conflict,
                        };
                        Step::Cas { expected: *expected_revision, value: intern(value), outcome }
                    }
                    (Call::Delete, _) => Step::Delete,
                    (Call::Read, _) => unreachable!("validated: answered reads carry Ret::Read"),
                };
                SearchOp { step, invoke: op.invoke, complete: op.complete }
            })
            .collect();
        Compiled { ops, indices: indices.to_vec(), values }
    }

    /// These ops less the unanswered writes and CASes whose value no read returned at a
    /// revision no write was acknowledged with (so no read can have seen them); `None` if
    /// there are none such.
    fn without_unread_writes(&self) -> Option<Compiled> {
        let acked: HashSet<u64> = self
            .ops
            .iter()
            .filter_map(|op| match op.step {
                Step::Write { revision: Some(rev), .. } | Step::Cas { outcome: CasOutcome::Ok(rev), .. } => Some(rev),
                _ => None,
            })
            .collect();
        let read: HashSet<u32> = self
            .ops
            .iter()
            .filter_map(|op| match op.step {
                Step::Read(Some((value, rev))) if !acked.contains(&rev) => Some(value),
                _ => None,
            })
            .collect();
        let keep = |op: &SearchOp| match op.step {
            Step::Write { revision: None, value } | Step::Cas { outcome: CasOutcome::Unknown, value, .. } => {
                read.contains(&value)
            }
            _ => true,
        };
        let kept: Vec<usize> = (0..self.ops.len()).filter(|&i| keep(&self.ops[i])).collect();
        (kept.len() < self.ops.len()).then(|| Compiled {
            ops: kept.iter().map(|&i| self.ops[i].clone()).collect(),
            indices: kept.iter().map(|&i| self.indices[i]).collect(),
            values: self.values.clone(),
        })
    }
}

/// Explains a search's deepest dead end; returns the text and the history indices it cites.
fn explain(compiled: &Compiled, history: &[Op], frontier: &Frontier, max_ops: usize) -> (String, Vec<usize>) {
    let (ops, indices) = (&compiled.ops, &compiled.indices);
    let show = ShowState { state: &frontier.state, values: &compiled.values };
    let mut placed = vec![false; ops.len()];
    frontier.linearized.iter().for_each(|&op| placed[op] = true);
    let deadline = ops[frontier.blocked].complete.expect("the blocking op returned");

    // Ops that could come next: not placed, invoked no later than the blocking op returned.
    let mut candidates: Vec<usize> = (0..ops.len()).filter(|&op| !placed[op] && ops[op].invoke <= deadline).collect();
    candidates.sort_by_key(|&op| (op != frontier.blocked, ops[op].invoke));
    // The last placed op that changed the register, and where it sits in the order.
    let set_at = frontier.linearized.iter().rposition(|&op| {
        matches!(
            ops[op].step,
            Step::Write { .. } | Step::Delete | Step::Cas { outcome: CasOutcome::Ok(_) | CasOutcome::Unknown, .. }
        )
    });
    let setter = set_at.map(|at| frontier.linearized[at]);

    let mut text = format!(
        "no order of its ops is consistent with both the register and real time. The longest consistent \
         order covers {placed} of {total} ops and leaves the register holding {show}",
        placed = frontier.linearized.len(),
        total = ops.len(),
    );
    if let Some(op) = setter {
        text.push_str(&format!(", last changed by #{}", indices[op]));
    }
    text.push_str(&format!(
        "; #{} returned at {deadline}, so it or another op invoked by then must come next, and none can:",
        indices[frontier.blocked]
    ));
    let shown = candidates.len().min(max_ops);
    for &op in &candidates[..shown] {
        let why = match apply(&frontier.state, &ops[op].step) {
            Err(Reject::CasNotAtExpected) if ops[op].complete.is_none() => {
                "had it taken effect it would have succeeded, but the register is not at its expected revision"
                    .to_string()
            }
            Err(reject) => reject.describe(),
            Ok(_) => "it fits here, but no order of the remaining ops fits after it".to_string(),
        };
        text.push_str(&format!("\n    #{} {}: {why}", indices[op], history[indices[op]]));
    }
    if candidates.len() > shown {
        text.push_str(&format!("\n    ... and {} more", candidates.len() - shown));
    }
    if frontier.linearized.iter().chain(&candidates).any(|&op| ops[op].complete.is_none()) {
        text.push_str(
            "\n  (ops with no answer may take effect at any point after their call, or never; every choice was tried)",
        );
    }

    // The slice, most telling first: the blocked op, what set the state, the candidates, the
    // writes whose values the candidate reads saw, the placed ops that observed the state since
    // it was set, then answered placed ops that overlap the candidates (they could have been
    // ordered differently), latest first.
    let earliest =
        candidates.iter().filter(|&&op| ops[op].complete.is_some()).map(|&op| ops[op].invoke).min().unwrap_or(deadline);
    let seen_revisions: Vec<u64> = candidates
        .iter()
        .filter_map(|&op| match ops[op].step {
            Step::Read(Some((_, rev))) => Some(rev),
            _ => None,
        })
        .collect();
    let writers = (0..ops.len()).filter(|&op| {
        matches!(ops[op].step, Step::Write { revision: Some(rev), .. } | Step::Cas { outcome: CasOutcome::Ok(rev), .. }
            if seen_revisions.contains(&rev))
    });
    let since_set = set_at.map_or(0, |at| at + 1);
    let mut picked: Vec<usize> =
        std::iter::once(frontier.blocked).chain(setter).chain(candidates.iter().copied()).collect();
    picked.extend(writers);
    picked.extend(frontier.linearized[since_set..].iter().rev());
    picked.extend(frontier.linearized.iter().rev().filter(|&&op| ops[op].complete.is_some_and(|c| c >= earliest)));
    (text, picked.into_iter().map(|op| indices[op]).collect())
}
