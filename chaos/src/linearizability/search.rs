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

use std::collections::HashMap;

use super::model::{apply, State, Step};

/// One op of a key, as the search sees it.
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
    Exhausted {
        steps: u64,
    },
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

/// Which ops are linearized so far, as two bitsets: ops that returned, ops with no answer.
struct Placed {
    answered: Vec<u64>,
    unanswered: Vec<u64>,
}

impl Placed {
    fn flip(&mut self, op: usize, answered: bool) {
        let bits = if answered { &mut self.answered } else { &mut self.unanswered };
        bits[op / 64] ^= 1 << (op % 64);
    }
}

/// The explored points of the search. A point is (placed answered ops, placed unanswered ops,
/// model state). Beyond Lowe's exact-repeat pruning, a point is also pruned when a finished
/// (failed) point had the same answered ops and state and a subset of its unanswered ops: the
/// ops that may come next depend only on which *answered* ops are placed (an unanswered op
/// never has to precede anything), so having placed more unanswered ops only removes options.
#[derive(Default)]
struct Memo {
    points: HashMap<(Box<[u64]>, State), Vec<(Box<[u64]>, bool)>>,
}

impl Memo {
    /// Records a point about to be explored; false if it need not be.
    fn enter(&mut self, placed: &Placed, state: &State) -> bool {
        let seen = self.points.entry((placed.answered.clone().into_boxed_slice(), state.clone())).or_default();
        let subsumed = seen.iter().any(|(unanswered, finished)| {
            **unanswered == *placed.unanswered
                || (*finished && unanswered.iter().zip(&placed.unanswered).all(|(a, b)| a & !b == 0))
        });
        if !subsumed {
            seen.push((placed.unanswered.clone().into_boxed_slice(), false));
        }
        !subsumed
    }

    /// Marks a point entered earlier as explored without success.
    fn finish(&mut self, placed: &Placed, state: &State) {
        let key = (placed.answered.clone().into_boxed_slice(), state.clone());
        if let Some(seen) = self.points.get_mut(&key) {
            if let Some(point) = seen.iter_mut().find(|(unanswered, _)| **unanswered == *placed.unanswered) {
                point.1 = true;
            }
        }
    }
}

/// Searches for a linearization of `ops`, trying at most `budget` model steps.
pub(super) fn search(ops: &[SearchOp], budget: u64) -> Outcome {
    let mut remaining = ops.iter().filter(|op| op.complete.is_some()).count();
    if remaining == 0 {
        return Outcome::Linearizable;
    }
    let mut events = Events::new(ops);
    let words = ops.len().div_ceil(64);
    let mut placed = Placed { answered: vec![0; words], unanswered: vec![0; words] };
    let mut memo = Memo::default();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state = State::initial();
    let mut deepest: Option<Frontier> = None;
    let mut steps = 0u64;
    // Each point of the search tries the ops that returned before those that got no answer:
    // an unanswered op is placed only where no answered op can go next. Together with the
    // memo's subsumption this keeps the unanswered ops of a chaos run from multiplying the
    // search: a point reached with an extra unanswered op placed (and overwritten since) is
    // usually one already explored without it.
    let mut unanswered_pass = false;
    let mut cursor = events.next[HEAD];
    loop {
        let is_event = cursor < events.op.len() - 1;
        if is_event && events.is_call[cursor] {
            let op = events.op[cursor];
            let answered = ops[op].complete.is_some();
            if answered == unanswered_pass {
                cursor = events.next[cursor];
                continue;
            }
            steps += 1;
            if steps > budget {
                return Outcome::Exhausted { steps: budget };
            }
            if let Ok(next) = apply(&state, &ops[op].step) {
                placed.flip(op, answered);
                if memo.enter(&placed, &next) {
                    stack.push((op, std::mem::replace(&mut state, next)));
                    events.lift(op);
                    if answered {
                        remaining -= 1;
                        if remaining == 0 {
                            return Outcome::Linearizable;
                        }
                    }
                    unanswered_pass = false;
                    cursor = events.next[HEAD];
                    continue;
                }
                placed.flip(op, answered);
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
            return Outcome::Violation(deepest.expect("the walk reaches a return before the stack empties"));
        };
        memo.finish(&placed, &state);
        let answered = ops[op].complete.is_some();
        state = previous;
        placed.flip(op, answered);
        events.unlift(op);
        if answered {
            remaining += 1;
        }
        // Resume the pass that placed it, after it.
        unanswered_pass = !answered;
        cursor = events.next[events.call_of[op]];
    }
}
