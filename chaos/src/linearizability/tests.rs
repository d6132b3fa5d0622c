//! Hand-written histories: linearizable ones that must pass, and one of each kind of violation,
//! with the explanations a human would read.

use super::*;

/// Ops on key "k" with a readable shorthand; `t` is `(invoke, complete)`.
fn op(client: u32, call: Call, ret: Ret, (invoke, complete): (u64, u64)) -> Op {
    Op { client, key: "k".into(), call, ret, invoke, complete: Some(complete) }
}

fn write(client: u32, t: (u64, u64), value: &str, revision: u64) -> Op {
    op(client, Call::Write { value: value.into() }, Ret::Written(revision), t)
}

fn read(client: u32, t: (u64, u64), seen: Option<(&str, u64)>) -> Op {
    let seen = seen.map(|(value, revision)| Versioned { value: value.into(), revision });
    op(client, Call::Read, Ret::Read(seen), t)
}

/// A CAS; `ok: None` is a conflict.
fn cas(client: u32, t: (u64, u64), expected_revision: u64, value: &str, ok: Option<u64>) -> Op {
    let ret = ok.map_or(Ret::CasConflict, Ret::CasOk);
    op(client, Call::Cas { expected_revision, value: value.into() }, ret, t)
}

fn delete(client: u32, t: (u64, u64)) -> Op {
    op(client, Call::Delete, Ret::Deleted, t)
}

/// The same op, but no answer ever came.
fn unanswered(op: Op) -> Op {
    Op { ret: Ret::Indeterminate, complete: None, ..op }
}

fn on(key: &str, op: Op) -> Op {
    Op { key: key.into(), ..op }
}

#[track_caller]
fn assert_linearizable(history: &[Op]) {
    let result = check(history);
    assert!(result.ok, "expected linearizable, got:\n{result}");
}

/// Asserts the history is not linearizable and returns the one anomaly, printed for review.
#[track_caller]
fn violation(history: &[Op]) -> (String, Vec<usize>) {
    let result = check(history);
    println!("{result}");
    assert!(!result.ok, "expected a violation");
    assert_eq!(result.anomalies.len(), 1, "{result}");
    match &result.anomalies[0] {
        Anomaly::NotLinearizable { explanation, ops, .. } => {
            (explanation.clone(), ops.iter().map(|o| o.index).collect())
        }
        other => panic!("expected NotLinearizable, got {other}"),
    }
}

#[test]
fn empty_and_sequential_histories_pass() {
    assert_linearizable(&[]);
    assert_linearizable(&[
        read(0, (0, 1), None),
        write(0, (2, 3), "a", 1),
        read(1, (4, 5), Some(("a", 1))),
        cas(0, (6, 7), 1, "b", Some(4)),
        cas(1, (8, 9), 1, "c", None),
        read(1, (10, 11), Some(("b", 4))),
        delete(0, (12, 13)),
        read(1, (14, 15), None),
        cas(1, (16, 17), 0, "d", Some(9)),
        read(0, (18, 19), Some(("d", 9))),
    ]);
}

#[test]
fn concurrent_read_may_see_either_side_of_a_write() {
    let base = [write(0, (0, 10), "a", 1), write(0, (20, 40), "b", 2)];
    assert_linearizable(&[base[0].clone(), base[1].clone(), read(1, (25, 30), Some(("a", 1)))]);
    assert_linearizable(&[base[0].clone(), base[1].clone(), read(1, (25, 30), Some(("b", 2)))]);
    // Equal times count as concurrent.
    assert_linearizable(&[base[0].clone(), base[1].clone(), read(1, (40, 45), Some(("a", 1)))]);
    // But once one read saw the new value, a read that starts after it cannot see the old one.
    let (why, ops) = violation(&[
        base[0].clone(),
        base[1].clone(),
        read(1, (21, 25), Some(("b", 2))),
        read(2, (26, 30), Some(("a", 1))),
    ]);
    assert_eq!(ops, vec![0, 2, 3]);
    assert!(why.starts_with("#3 read \"a\"@1, but #2 had read revision 2 at 25, before #3 began at 26"), "{why}");
}

#[test]
fn stale_read_after_acknowledged_write_fails() {
    let (why, ops) = violation(&[
        write(0, (0, 10), "a", 1),
        write(0, (20, 30), "b", 2),
        read(1, (40, 50), Some(("a", 1))),
        read(2, (60, 70), Some(("a", 1))),
    ]);
    assert!(
        why.starts_with("#2 read \"a\"@1, but #1 had been acknowledged with revision 2 at 30, before #2 began at 40"),
        "{why}"
    );
    assert!(why.ends_with("1 more ops begun later did the same: #3"), "{why}");
    assert_eq!(ops, vec![0, 1, 2, 3]);
}

#[test]
fn read_of_a_deleted_value_fails() {
    // Not a revision going backwards, so it takes the search to find.
    let (why, ops) = violation(&[write(0, (0, 10), "a", 1), delete(0, (20, 30)), read(1, (40, 50), Some(("a", 1)))]);
    assert!(why.contains("covers 2 of 3 ops"), "{why}");
    assert!(why.contains("holding nothing (deleted), last changed by #1"), "{why}");
    assert!(why.contains("#2 client 1 [40, 50] read -> \"a\"@1: it saw a value"), "{why}");
    assert_eq!(ops, vec![0, 1, 2]);
}

#[test]
fn two_successful_cas_with_the_same_expected_revision_fail() {
    let (why, ops) =
        violation(&[write(0, (0, 10), "a", 1), cas(1, (20, 30), 1, "b", Some(2)), cas(2, (22, 32), 1, "c", Some(3))]);
    assert!(why.contains("not at its expected revision"), "{why}");
    assert_eq!(ops, vec![1, 2]);
    // "Only if absent" twice needs a delete in between.
    let twice_absent = [cas(1, (0, 10), 0, "b", Some(2)), cas(2, (5, 15), 0, "c", Some(3))];
    violation(&twice_absent);
    let mut with_delete = twice_absent.to_vec();
    with_delete.push(delete(3, (8, 12)));
    assert_linearizable(&with_delete);
}

#[test]
fn cas_conflict_needs_a_differing_revision() {
    assert_linearizable(&[write(0, (0, 10), "a", 1), cas(1, (20, 30), 7, "b", None)]);
    let (why, _) = violation(&[write(0, (0, 10), "a", 1), cas(1, (20, 30), 1, "b", None)]);
    assert!(why.contains("reported a conflict, but the register is at its expected revision"), "{why}");
}

#[test]
fn read_of_a_value_never_written_fails_without_search() {
    let (why, ops) = violation(&[write(0, (0, 10), "a", 1), read(1, (20, 30), Some(("zzz", 7)))]);
    assert!(why.contains("#1 read \"zzz\"@7, which no write produced"), "{why}");
    assert_eq!(ops, vec![1]);
    // Right value, wrong revision: points at the write that owns the revision.
    let (why, ops) =
        violation(&[write(0, (0, 10), "a", 1), write(0, (11, 12), "b", 2), read(1, (20, 30), Some(("a", 2)))]);
    assert!(why.contains("revision 2 was acknowledged to #1 for another value"), "{why}");
    assert_eq!(ops, vec![1, 2]);
}

#[test]
fn revisions_going_backwards_fail() {
    let (why, _) = violation(&[write(0, (0, 10), "a", 5), write(0, (20, 30), "b", 3)]);
    assert!(
        why.starts_with("#1 was acknowledged with revision 3, but #0 had been acknowledged with revision 5"),
        "{why}"
    );
    // Also across a delete: revisions are never reused.
    violation(&[write(0, (0, 10), "a", 5), delete(0, (11, 12)), cas(0, (20, 30), 0, "b", Some(4))]);
    // A CAS cannot expect a revision the key has left behind.
    let (why, _) = violation(&[write(0, (0, 10), "a", 5), cas(0, (20, 30), 4, "b", Some(6))]);
    assert!(why.starts_with("#1 succeeded expecting revision 4"), "{why}");
    // And two writes cannot share one.
    let (why, _) = violation(&[write(0, (0, 10), "a", 5), write(1, (0, 10), "b", 5)]);
    assert!(why.contains("both acknowledged with revision 5"), "{why}");
}

#[test]
fn lost_write_after_a_crash_fails_both_checks() {
    let history = [
        write(0, (0, 10), "a", 1),
        write(0, (20, 30), "b", 2),
        // ... leader killed, cluster healed; the final read:
        read(9, (100, 110), Some(("a", 1))),
    ];
    violation(&history);
    let lost = lost_writes(&history);
    println!("{}", lost.iter().map(ToString::to_string).collect::<String>());
    assert_eq!(lost.len(), 1);
    assert_eq!((lost[0].write.index, lost[0].read.index), (1, 2));
    assert!(lost[0].explanation.contains("read \"a\"@1, an older revision"), "{}", lost[0].explanation);

    let vanished = [write(0, (0, 10), "a", 1), read(9, (100, 110), None)];
    violation(&vanished);
    let lost = lost_writes(&vanished);
    assert_eq!(lost.len(), 1);
    assert!(lost[0].explanation.contains("no delete could have happened"), "{}", lost[0].explanation);

    // A delete that may have come after the write explains the absence; one before it doesn't.
    assert!(lost_writes(&[vanished[0].clone(), unanswered(delete(1, (50, 0))), vanished[1].clone()]).is_empty());
    assert_eq!(lost_writes(&[delete(1, (0, 1)), write(0, (2, 10), "a", 1), read(9, (100, 110), None)]).len(), 1);
}

#[test]
fn lost_writes_accepts_superseded_and_concurrent_reads() {
    assert!(lost_writes(&[
        write(0, (0, 10), "a", 1),
        read(1, (5, 15), None),               // concurrent with the write: may precede it
        read(1, (20, 25), Some(("a", 1))),    // sees it
        read(2, (30, 35), Some(("x", 5))),    // superseded by a later revision
        on("other", read(2, (30, 35), None)), // another key
    ])
    .is_empty());
}

#[test]
fn unanswered_write_may_take_effect_late_or_never() {
    let a = write(0, (0, 10), "a", 1);
    let late = unanswered(write(1, (20, 0), "b", 0));
    // Took effect long after the client gave up.
    assert_linearizable(&[
        a.clone(),
        late.clone(),
        read(2, (30, 40), Some(("a", 1))),
        read(2, (1000, 1010), Some(("b", 5))),
    ]);
    // Never took effect.
    assert_linearizable(&[a.clone(), late.clone(), read(2, (1000, 1010), Some(("a", 1)))]);
    // But not before it was sent...
    violation(&[a.clone(), read(2, (12, 18), Some(("b", 5))), late.clone()]);
    // ...nor at a revision below one already taken...
    let (why, _) = violation(&[write(0, (0, 10), "a", 5), late.clone(), read(2, (30, 40), Some(("b", 4)))]);
    assert!(why.starts_with("#2 read \"b\"@4, but #0 had been acknowledged with revision 5"), "{why}");
    // ...nor twice: once its effect is seen and overwritten, it cannot reappear.
    violation(&[
        a,
        late,
        read(2, (30, 40), Some(("b", 5))),
        write(2, (50, 60), "c", 6),
        read(2, (70, 80), Some(("b", 5))),
    ]);
}

#[test]
fn unanswered_write_nobody_read_can_explain_a_conflict() {
    // Only the unanswered write can have moved the key off revision 1; the quick pass (which
    // leaves it out) finds no order, and the full search must not report a violation.
    let a = write(0, (0, 10), "a", 1);
    let conflict = cas(2, (30, 40), 1, "c", None);
    assert_linearizable(&[a.clone(), unanswered(write(1, (20, 0), "b", 0)), conflict.clone()]);
    violation(&[a, conflict]);
}

#[test]
fn unanswered_cas_and_delete_are_all_or_nothing() {
    let a = write(0, (0, 10), "a", 1);
    let maybe_cas = unanswered(cas(1, (20, 0), 1, "b", None));
    assert_linearizable(&[a.clone(), maybe_cas.clone(), read(2, (30, 40), Some(("b", 7)))]);
    assert_linearizable(&[a.clone(), maybe_cas.clone(), read(2, (30, 40), Some(("a", 1)))]);
    // If it took effect it succeeded, which needs the expected revision.
    violation(&[a.clone(), unanswered(cas(1, (20, 0), 9, "b", None)), read(2, (30, 40), Some(("b", 12)))]);

    let maybe_delete = unanswered(delete(1, (20, 0)));
    assert_linearizable(&[a.clone(), maybe_delete.clone(), read(2, (30, 40), Some(("a", 1))), read(2, (50, 60), None)]);
    violation(&[a.clone(), maybe_delete, read(2, (50, 60), None), read(2, (70, 80), Some(("a", 1)))]);
}

#[test]
fn conflicting_cas_rules_out_a_revision_for_an_unanswered_write() {
    // The CAS "if absent" conflicted, so the unanswered write of "b" had happened by then; the
    // CAS "if @2" conflicted too, so "b" is not at revision 2 and the read cannot see "b"@2.
    let history = |seen_revision| {
        vec![
            unanswered(write(0, (0, 0), "b", 0)),
            cas(1, (10, 20), 0, "z", None),
            cas(1, (30, 40), 2, "z", None),
            read(2, (50, 60), Some(("b", seen_revision))),
        ]
    };
    assert_linearizable(&history(3));
    violation(&history(2));
}

#[test]
fn unanswered_reads_are_dropped() {
    let result = check(&[write(0, (0, 10), "a", 1), unanswered(read(1, (20, 0), Some(("garbage", 99))))]);
    assert!(result.ok, "{result}");
    assert_eq!((result.keys_checked, result.ops_checked), (1, 1));
}

#[test]
fn keys_are_checked_independently() {
    let result = check(&[
        on("a", write(0, (0, 10), "x", 1)),
        on("b", write(0, (0, 10), "y", 2)),
        on("a", read(1, (20, 30), Some(("x", 1)))),
        on("b", read(1, (20, 30), None)),
    ]);
    assert_eq!((result.keys_checked, result.ops_checked), (2, 4));
    assert_eq!(result.anomalies.len(), 1, "{result}");
    assert_eq!(result.anomalies[0].key(), "b");
    assert!(result.anomalies[0].is_violation());
}

#[test]
fn malformed_ops_are_reported_not_checked() {
    let result = check(&[
        op(0, Call::Read, Ret::Written(1), (0, 10)),
        write(0, (20, 10), "a", 1),
        op(0, Call::Delete, Ret::Indeterminate, (0, 10)),
    ]);
    assert!(!result.ok);
    let Anomaly::Malformed { reason, ops, .. } = &result.anomalies[0] else { panic!("{result}") };
    assert!(reason.starts_with("3 op(s) cannot be checked; first: its answer does not fit its call"), "{reason}");
    assert_eq!(ops.len(), 3);
    assert!(!result.anomalies[0].is_violation());
}

#[test]
fn search_budget_reports_unknown() {
    let history: Vec<Op> = (0..6).map(|i| write(i, (0, 100), &format!("v{i}"), u64::from(i) + 1)).collect();
    let config = CheckConfig { max_steps_per_key: 3, ..CheckConfig::default() };
    let result = check_with(&history, &config);
    assert!(!result.ok);
    let Anomaly::Unknown { key, reason } = &result.anomalies[0] else { panic!("{result}") };
    assert_eq!(key, "k");
    assert!(reason.contains("after 3 model steps"), "{reason}");
    assert!(check(&history).ok);
}

#[test]
fn history_and_result_round_trip_through_json() {
    let history = vec![
        write(0, (0, 10), "a", 1),
        cas(1, (20, 30), 1, "b", Some(2)),
        unanswered(delete(2, (40, 0))),
        read(1, (50, 60), Some(("b", 2))),
        read(1, (50, 60), Some(("a", 1))),
    ];
    let json = serde_json::to_string(&history).unwrap();
    assert!(json.contains(r#""call":{"cas":{"expected_revision":1,"value":"b"}},"ret":{"cas_ok":2}"#), "{json}");
    assert!(json.contains(r#""ret":"indeterminate","invoke":40,"complete":null"#), "{json}");
    let back: Vec<Op> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, history);
    let result = check(&back);
    let json = serde_json::to_string(&result).unwrap();
    assert!(json.contains(r#""kind":"not_linearizable""#), "{json}");
    assert_eq!(serde_json::from_str::<CheckResult>(&json).unwrap(), result);
}
