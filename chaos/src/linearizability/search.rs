//! The per-key search: Wing & Gong's backtracking with Lowe's memoization, over Porcupine's
//! event list.
//!
//! ```text
//!  events, by time:   c0  c1  r0  c2  r1  r2        (cN = call of op N, rN = its return)
//!  walk from head ──▶ at cN: apply op N to the model; if it fits and (linearized set, state)
//!                     is new, lift cN and rN out of the list, push, restart from head
//!                     at rN: op N returned and is still not linearized ⇒ dead end: pop the
//!                     last lifted op, put it back, continue after its call
//! ```
//!
//! Only calls that precede every remaining return are reachable from the head, so each try is
//! a *minimal* op: one no pending op finished before. An op with no answer has no return event,
//! so it never blocks the walk: it may be lifted at any point after its call, or never; the
//! search succeeds as soon as every op that returned is linearized.
//!
//! Unanswered ops could go almost anywhere, so the search restricts where it tries them, each
//! restriction keeping at least one linearization if any exists:
//! - at each point it tries the answered ops first, then the unanswered ones;
//! - of several unanswered ops with the same effect it tries only the earliest (`twin`);
//! - an unanswered op must be followed by an op that needs it: one that would not fit without
//!   it (`needless_unanswered`), or at least anything but a blind overwrite (`hides_unanswered`).

use std::collections::{HashMap, HashSet};

use super::model::{apply, CasOutcome, Rev, State, Step};

/// One op of a key, as the search sees it.
#[derive(Clone, Debug)]
pub(super) struct SearchOp {
    pub step: Step,
    pub invoke: u64,
    /// `None` when the op got no answer.
    pub complete: Option<u64>,
}

/// The deepest point the search reached before every order ran into an op that could not
/// take effect.
#[derive(Debug)]
pub(super) struct Frontier {
    /// Ops (indices into the search's input) in the order they were linearized.
    pub linearized: Vec<usize>,
    pub state: State,
    /// The op whose return the walk reached without having linearized it.
    pub blocked: usize,
}

#[derive(Debug)]
pub(super) enum Outcome {
    Linearizable,
    Violation(Frontier),
    /// The step budget ran out before the search finished.
    Exhausted,
}

const HEAD: usize = 0;

struct Events {
    op: Vec<usize>,
    is_call: Vec<bool>,
    next: Vec<usize>,
    prev: Vec<usize>,
    call_of: Vec<usize>,
    return_of: Vec<Option<usize>>,
}

impl Events {
    /// Events sorted by time; at equal times calls come first, so the ops count as concurrent.
    fn new(ops: &[SearchOp]) -> Self {
        let mut sorted: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            sorted.push((op.invoke, false, i));
            if let Some(complete) = op.complete {
                sorted.push((complete, true, i));
            }
        }
        sorted.sort_unstable();
        let len = sorted.len() + 2; // HEAD sentinel, events, tail sentinel
        let mut events = Events {
            op: vec![usize::MAX; len],
            is_call: vec![false; len],
            next: (1..=len).collect(),
            prev: (0..len).map(|i| i.wrapping_sub(1)).collect(),
            call_of: vec![0; ops.len()],
            return_of: vec![None; ops.len()],
        };
        for (slot, (_, is_return, op)) in sorted.into_iter().enumerate() {
            let e = slot + 1;
            events.op[e] = op;
            events.is_call[e] = !is_return;
            if is_return {
                events.return_of[op] = Some(e);
            } else {
                events.call_of[op] = e;
            }
        }
        events
    }

    fn unlink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = n;
        self.prev[n] = p;
    }

    fn relink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = e;
        self.prev[n] = e;
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call_of[op]);
        if let Some(r) = self.return_of[op] {
            self.unlink(r);
        }
    }

    /// Undoes the latest [`Events::lift`] (dancing links: relink in reverse order).
    fn unlift(&mut self, op: usize) {
        if let Some(r) = self.return_of[op] {
            self.relink(r);
        }
        self.relink(self.call_of[op]);
    }
}

/// Whether placing the blind overwrite `next` (a write or delete: it replaces the register
/// without looking at it) on top of `stack` would make an unanswered op pointless: the last op
/// placed before a run of CAS conflicts is unanswered, and those conflicts hold without it.
/// Nothing then saw its effect, so the order is dominated by the same order without it (which
/// only lowers the revision floor), and that order is searched anyway: an unanswered op never
/// has to precede anything, so every op placed after it could have been placed without it.
/// (With conflicts in between, the state before the op must hold a known revision: conflicts
/// narrowing an unknown revision could otherwise raise the floor of the order without it.)
fn hides_unanswered(ops: &[SearchOp], stack: &[(usize, State)], next: usize) -> bool {
    if !matches!(ops[next].step, Step::Write { .. } | Step::Delete) {
        return false;
    }
    let conflict = |op: usize| matches!(ops[op].step, Step::Cas { outcome: CasOutcome::Conflict, .. });
    let run = stack.iter().rev().take_while(|(op, _)| conflict(*op)).count();
    let Some((last, before)) = stack.len().checked_sub(run + 1).map(|at| &stack[at]) else { return false };
    let unknown_before = matches!(before.current, Some((_, Rev::Unknown { .. })));
    if ops[*last].complete.is_some() || matches!(ops[*last].step, Step::Read(_)) || (run > 0 && unknown_before) {
        return false;
    }
    let mut state = before.clone();
    stack[stack.len() - run..].iter().all(|(op, _)| match apply(&state, &ops[*op].step) {
        Ok(next) => {
            state = next;
            true
        }
        Err(_) => false,
    })
}

/// Whether `next` would follow an unanswered op it does not need: it also fits the state
/// before that op, and that state holds a known revision (or nothing). Then swapping the two
/// gives an order at least as permissive (a CAS conflict fitting both states leaves a known
/// state as it is; no read or successful CAS fits both), and that order is searched anyway.
/// After an unanswered op is placed, only an op that needs it may come next.
fn needless_unanswered(ops: &[SearchOp], stack: &[(usize, State)], next: usize) -> bool {
    let Some((last, before)) = stack.last() else { return false };
    ops[*last].complete.is_none()
        && !matches!(before.current, Some((_, Rev::Unknown { .. })))
        && apply(before, &ops[next].step).is_ok()
}

/// Searches for a linearization of `ops`, trying at most `budget` model steps; returns the
/// outcome and the steps taken.
pub(super) fn search(ops: &[SearchOp], budget: u64) -> (Outcome, u64) {
    let mut remaining = ops.iter().filter(|op| op.complete.is_some()).count();
    if remaining == 0 {
        return (Outcome::Linearizable, 0);
    }
    let mut events = Events::new(ops);
    // Unanswered ops with the same step are interchangeable once invoked, so each point tries
    // only the earliest unplaced one of each kind: `twin[op]` is the previous such op.
    let mut twin = vec![None; ops.len()];
    let mut last_of_kind: HashMap<&Step, usize> = HashMap::new();
    let mut by_invoke: Vec<usize> = (0..ops.len()).filter(|&op| ops[op].complete.is_none()).collect();
    by_invoke.sort_by_key(|&op| (ops[op].invoke, op));
    for op in by_invoke {
        twin[op] = last_of_kind.insert(&ops[op].step, op);
    }
    let mut linearized = vec![0u64; ops.len().div_ceil(64)];
    let mut seen: HashSet<(Box<[u64]>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state = State::initial();
    let mut deepest: Option<Frontier> = None;
    let mut steps = 0u64;
    let mut unanswered_pass = false;
    let mut cursor = events.next[HEAD];
    loop {
        let is_event = cursor < events.op.len() - 1;
        if is_event && events.is_call[cursor] {
            let op = events.op[cursor];
            let placed_twin = |t: usize| linearized[t / 64] & (1 << (t % 64)) != 0;
            if ops[op].complete.is_none() != unanswered_pass || twin[op].is_some_and(|t| !placed_twin(t)) {
                cursor = events.next[cursor];
                continue;
            }
            // Prune orders where an unanswered op had no visible effect.
            if hides_unanswered(ops, &stack, op) || needless_unanswered(ops, &stack, op) {
                cursor = events.next[cursor];
                continue;
            }
            steps += 1;
            if steps > budget {
                return (Outcome::Exhausted, budget);
            }
            match apply(&state, &ops[op].step) {
                // An unanswered op that changes nothing is as good as never placed.
                Ok(next) if ops[op].complete.is_none() && next == state => {}
                Ok(next) => {
                    linearized[op / 64] |= 1 << (op % 64);
                    if seen.insert((linearized.clone().into_boxed_slice(), next.clone())) {
                        stack.push((op, std::mem::replace(&mut state, next)));
                        events.lift(op);
                        if ops[op].complete.is_some() {
                            remaining -= 1;
                            if remaining == 0 {
                                return (Outcome::Linearizable, steps);
                            }
                        }
                        unanswered_pass = false;
                        cursor = events.next[HEAD];
                        continue;
                    }
                    linearized[op / 64] &= !(1 << (op % 64));
                }
                Err(_) => {}
            }
            cursor = events.next[cursor];
            continue;
        }
        // A return of an op not yet linearized (the tail is unreachable while a return
        // remains, but treat it the same): no answered op fits here; try the unanswered ones.
        if !unanswered_pass {
            unanswered_pass = true;
            cursor = events.next[HEAD];
            continue;
        }
        // Nothing fits here: backtrack.
        if deepest.as_ref().is_none_or(|d| stack.len() > d.linearized.len()) && is_event {
            deepest = Some(Frontier {
                linearized: stack.iter().map(|(op, _)| *op).collect(),
                state: state.clone(),
                blocked: events.op[cursor],
            });
        }
        let Some((op, previous)) = stack.pop() else {
            return (Outcome::Violation(deepest.expect("the walk reaches a return before the stack empties")), steps);
        };
        state = previous;
        linearized[op / 64] &= !(1 << (op % 64));
        events.unlift(op);
        if ops[op].complete.is_some() {
            remaining += 1;
        }
        unanswered_pass = ops[op].complete.is_none();
        cursor = events.next[events.call_of[op]];
    }
}
