//! The sequential specification the search linearizes against: one key of the object store as a
//! register holding `(value, revision)` or nothing, where every write takes a revision above every
//! revision taken before it (the store's revision is one global counter, so per key it only
//! grows, with gaps).
//!
//! Values are interned to `u32` per key so a [`State`] is cheap to hash and clone for the memo.
//! A write with no answer has a revision nobody was told; it is kept as [`Rev::Unknown`] until
//! a read or a CAS pins it, and when it is overwritten or deleted unobserved it is settled to the
//! smallest revision it could have had, which is always the most permissive choice (everything
//! after it only needs revisions *above* it).

use std::fmt;

/// One op, compiled for the model: values interned, the answer folded in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Step {
    /// A read that answered `Some((value, revision))` or `None` (absent).
    Read(Option<(u32, u64)>),
    /// An unconditional put; `revision` is `None` when it got no answer.
    Write { value: u32, revision: Option<u64> },
    /// A compare-and-set on the revision (0 = "only if absent").
    Cas { expected: u64, value: u32, outcome: CasOutcome },
    /// A delete, answered or not: either way, if it happens, the key is absent afterwards.
    Delete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum CasOutcome {
    Ok(u64),
    Conflict,
    /// No answer. If it is linearized at all it succeeded: a failed CAS changes nothing, which
    /// is the same as never linearizing it.
    Unknown,
}

/// The register's content at one point of a candidate linearization.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct State {
    /// The highest revision taken by any op linearized so far (0 before the first write).
    pub max_rev: u64,
    /// `None`: absent. `Some((value, rev))`: the value and the revision it was written at.
    pub current: Option<(u32, Rev)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Rev {
    Known(u64),
    /// Written by an op that got no answer: some revision above [`State::max_rev`], and none of
    /// `excluded` (revisions a conflicting CAS has ruled out), kept sorted.
    Unknown {
        excluded: Vec<u64>,
    },
}

/// Why an op cannot take effect in a given state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reject {
    /// A read answered absent while the register holds a value.
    SawNothing,
    /// A read answered a value while the key is absent.
    SawSomething,
    /// A read answered a different value than the register holds.
    Value,
    /// A read answered the right value at another revision.
    Revision,
    /// A read pinned an unacknowledged write to a revision it cannot have had.
    RevisionRuledOut,
    /// A write or CAS was acknowledged with a revision not above one already taken.
    NotIncreasing { floor: u64 },
    /// A CAS succeeded although the register was not at its expected revision.
    CasNotAtExpected,
    /// A CAS reported a conflict although the register was at its expected revision.
    CasWasAtExpected,
}

impl State {
    pub(super) fn initial() -> Self {
        State { max_rev: 0, current: None }
    }

    /// The revision counter once an unobserved unknown revision is settled to its smallest
    /// possible value.
    fn settled_max(&self) -> u64 {
        match &self.current {
            Some((_, Rev::Unknown { excluded })) => smallest_above(self.max_rev, excluded),
            _ => self.max_rev,
        }
    }

    /// Whether the register can be at revision `expected` (0 = absent); returns the revision
    /// counter after pinning an unknown revision to `expected`.
    fn at_revision(&self, expected: u64) -> Option<u64> {
        match (&self.current, expected) {
            (None, 0) => Some(self.max_rev),
            (Some((_, Rev::Known(rev))), e) if e != 0 && *rev == e => Some(self.max_rev),
            (Some((_, Rev::Unknown { excluded })), e) if e > self.max_rev && !excluded.contains(&e) => Some(e),
            _ => None,
        }
    }
}

fn smallest_above(floor: u64, excluded: &[u64]) -> u64 {
    let mut rev = floor + 1;
    while excluded.binary_search(&rev).is_ok() {
        rev += 1;
    }
    rev
}

fn written(value: u32, revision: Option<u64>, floor: u64) -> Result<State, Reject> {
    match revision {
        Some(rev) if rev <= floor => Err(Reject::NotIncreasing { floor }),
        Some(rev) => Ok(State { max_rev: rev, current: Some((value, Rev::Known(rev))) }),
        None => Ok(State { max_rev: floor, current: Some((value, Rev::Unknown { excluded: Vec::new() })) }),
    }
}

/// Applies `step` to `state`: the state after it, or why it cannot happen here.
pub(super) fn apply(state: &State, step: &Step) -> Result<State, Reject> {
    match step {
        Step::Read(None) => match state.current {
            None => Ok(state.clone()),
            Some(_) => Err(Reject::SawNothing),
        },
        Step::Read(Some((value, rev))) => match &state.current {
            None => Err(Reject::SawSomething),
            Some((held, _)) if held != value => Err(Reject::Value),
            Some((_, Rev::Known(held))) if held == rev => Ok(state.clone()),
            Some((_, Rev::Known(_))) => Err(Reject::Revision),
            Some((_, Rev::Unknown { excluded })) if *rev > state.max_rev && !excluded.contains(rev) => {
                Ok(State { max_rev: *rev, current: Some((*value, Rev::Known(*rev))) })
            }
            Some((_, Rev::Unknown { .. })) => Err(Reject::RevisionRuledOut),
        },
        Step::Write { value, revision } => written(*value, *revision, state.settled_max()),
        Step::Cas { expected, value, outcome: CasOutcome::Ok(rev) } => {
            let floor = state.at_revision(*expected).ok_or(Reject::CasNotAtExpected)?;
            written(*value, Some(*rev), floor)
        }
        Step::Cas { expected, value, outcome: CasOutcome::Unknown } => {
            let floor = state.at_revision(*expected).ok_or(Reject::CasNotAtExpected)?;
            written(*value, None, floor)
        }
        Step::Cas { expected, outcome: CasOutcome::Conflict, .. } => match &state.current {
            Some((value, Rev::Unknown { excluded })) if *expected > state.max_rev => {
                // The unknown revision may differ from `expected`; from now on it must.
                let mut excluded = excluded.clone();
                if let Err(at) = excluded.binary_search(expected) {
                    excluded.insert(at, *expected);
                }
                Ok(State { max_rev: state.max_rev, current: Some((*value, Rev::Unknown { excluded })) })
            }
            _ if state.at_revision(*expected).is_some() => Err(Reject::CasWasAtExpected),
            _ => Ok(state.clone()),
        },
        Step::Delete => Ok(State { max_rev: state.settled_max(), current: None }),
    }
}

/// Renders a state with the key's interned values, e.g. `"b"@7`, `absent`.
pub(super) struct ShowState<'a> {
    pub state: &'a State,
    pub values: &'a [String],
}

impl fmt::Display for ShowState<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state.current {
            None if self.state.max_rev == 0 => write!(f, "nothing"),
            None => write!(f, "nothing (deleted)"),
            Some((value, Rev::Known(rev))) => write!(f, "{:?}@{rev}", self.values[*value as usize]),
            Some((value, Rev::Unknown { .. })) => write!(
                f,
                "{:?}@? (from a write with no answer, so at some revision above {})",
                self.values[*value as usize], self.state.max_rev
            ),
        }
    }
}

impl Reject {
    /// A short sentence saying what the op saw or did that the register contradicts.
    pub(super) fn describe(self) -> String {
        match self {
            Reject::SawNothing => "it saw the key absent".into(),
            Reject::SawSomething => "it saw a value".into(),
            Reject::Value => "it saw a different value".into(),
            Reject::Revision => "it saw the value at a different revision".into(),
            Reject::RevisionRuledOut => "it saw the value at a revision that write cannot have had".into(),
            Reject::NotIncreasing { floor } => {
                format!("its revision is not above {floor}, a revision already taken (revisions only grow)")
            }
            Reject::CasNotAtExpected => "the CAS succeeded, but the register is not at its expected revision".into(),
            Reject::CasWasAtExpected => {
                "the CAS reported a conflict, but the register is at its expected revision".into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(value: u32, rev: u64) -> State {
        State { max_rev: rev, current: Some((value, Rev::Known(rev))) }
    }

    #[test]
    fn write_needs_a_revision_above_every_earlier_one() {
        let s = known(0, 5);
        assert_eq!(apply(&s, &Step::Write { value: 1, revision: Some(5) }), Err(Reject::NotIncreasing { floor: 5 }));
        assert_eq!(apply(&s, &Step::Write { value: 1, revision: Some(9) }), Ok(known(1, 9)));
        let deleted = apply(&s, &Step::Delete).unwrap();
        assert_eq!(
            apply(&deleted, &Step::Write { value: 1, revision: Some(4) }),
            Err(Reject::NotIncreasing { floor: 5 })
        );
    }

    #[test]
    fn cas_succeeds_iff_at_expected_revision() {
        let absent = State::initial();
        let ok = |expected, rev| Step::Cas { expected, value: 1, outcome: CasOutcome::Ok(rev) };
        let conflict = |expected| Step::Cas { expected, value: 1, outcome: CasOutcome::Conflict };
        assert_eq!(apply(&absent, &ok(0, 3)), Ok(known(1, 3)));
        assert_eq!(apply(&absent, &ok(2, 3)), Err(Reject::CasNotAtExpected));
        assert_eq!(apply(&absent, &conflict(0)), Err(Reject::CasWasAtExpected));
        assert_eq!(apply(&absent, &conflict(2)), Ok(absent.clone()));
        let s = known(0, 2);
        assert_eq!(apply(&s, &ok(2, 3)), Ok(known(1, 3)));
        assert_eq!(apply(&s, &ok(0, 3)), Err(Reject::CasNotAtExpected));
        assert_eq!(apply(&s, &conflict(2)), Err(Reject::CasWasAtExpected));
        assert_eq!(apply(&s, &conflict(0)), Ok(s.clone()));
    }

    #[test]
    fn unknown_revision_is_pinned_by_reads_and_narrowed_by_conflicts() {
        let s = apply(&known(0, 4), &Step::Write { value: 1, revision: None }).unwrap();
        assert_eq!(apply(&s, &Step::Read(Some((1, 4)))), Err(Reject::RevisionRuledOut));
        assert_eq!(apply(&s, &Step::Read(Some((1, 6)))), Ok(known(1, 6)));
        let s = apply(&s, &Step::Cas { expected: 5, value: 2, outcome: CasOutcome::Conflict }).unwrap();
        assert_eq!(apply(&s, &Step::Read(Some((1, 5)))), Err(Reject::RevisionRuledOut));
        // Overwritten unobserved: settled to the smallest revision left, 6, so 6 is taken.
        assert_eq!(apply(&s, &Step::Write { value: 2, revision: Some(6) }), Err(Reject::NotIncreasing { floor: 6 }));
        assert_eq!(apply(&s, &Step::Write { value: 2, revision: Some(7) }), Ok(known(2, 7)));
        // A CAS may expect the unknown revision, pinning it.
        let cas = Step::Cas { expected: 9, value: 2, outcome: CasOutcome::Ok(10) };
        assert_eq!(apply(&s, &cas), Ok(known(2, 10)));
    }
}
