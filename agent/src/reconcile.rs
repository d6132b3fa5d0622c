//! The reconcile decision: desired assignments (the last `Assign`) versus the engines the
//! agent runs → the actions that close the gap. Pure; the engine manager executes them.
//!
//! ```text
//!  desired only                 → Start
//!  both, same assignment        → Keep   (a failed engine stays failed until unassigned)
//!  both, only adapters changed  → UpdateAdapters (never a restart: the engine task loads
//!                                 and unloads them through the engine API)
//!  both, engine changed         → Replace (stop, then start with the new assignment)
//!  actual only                  → Stop
//! ```
//!
//! An engine's identity is its assignment without `adapters` and `traceparent`
//! ([`same_engine`]).

use std::collections::{BTreeMap, BTreeSet};

use flotilla_api::pb::ReplicaAssignment;

/// What to do with one replica.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a new engine.
    Start(ReplicaAssignment),
    /// Stop the engine of this replica.
    Stop(String),
    /// Stop the engine, then start it again with the new assignment.
    Replace(ReplicaAssignment),
    /// Keep the engine; hand it this assignment's adapter list.
    UpdateAdapters(ReplicaAssignment),
    /// Leave it as it is.
    Keep(String),
}

/// True when `a` and `b` describe the same engine process: equal in everything but the
/// adapters, which change without a restart.
pub fn same_engine(a: &ReplicaAssignment, b: &ReplicaAssignment) -> bool {
    let ReplicaAssignment {
        replica,
        model,
        engine,
        source,
        engine_args,
        gpus,
        engine_image,
        adapters: _,
        traceparent: _,
        gang,
        kv_transfer,
    } = a;
    *replica == b.replica
        && *model == b.model
        && *engine == b.engine
        && *source == b.source
        && *engine_args == b.engine_args
        && *gpus == b.gpus
        && *engine_image == b.engine_image
        && *gang == b.gang
        && *kv_transfer == b.kv_transfer
}

/// Decides the actions, in replica-name order. `actual` maps each running (or adopted, or
/// failed) engine's replica to the assignment it was started with. A replica listed twice
/// in `desired` counts once (the first entry).
pub fn reconcile(desired: &[ReplicaAssignment], actual: &BTreeMap<String, ReplicaAssignment>) -> Vec<Action> {
    let mut seen = BTreeSet::new();
    let mut wanted: BTreeMap<&str, &ReplicaAssignment> = BTreeMap::new();
    for a in desired {
        if seen.insert(a.replica.as_str()) {
            wanted.insert(a.replica.as_str(), a);
        }
    }
    let names: BTreeSet<&str> = wanted.keys().copied().chain(actual.keys().map(String::as_str)).collect();
    names
        .into_iter()
        .map(|name| match (wanted.get(name), actual.get(name)) {
            (Some(want), None) => Action::Start((*want).clone()),
            // the traceparent is not the engine's: an adopted engine's assignment has none
            (Some(want), Some(have)) if same_engine(want, have) && want.adapters == have.adapters => {
                Action::Keep(name.to_string())
            }
            (Some(want), Some(have)) if same_engine(want, have) => Action::UpdateAdapters((*want).clone()),
            (Some(want), Some(_)) => Action::Replace((*want).clone()),
            (None, _) => Action::Stop(name.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::pb::AdapterAssignment;

    fn a(name: &str, gpus: &[u32]) -> ReplicaAssignment {
        ReplicaAssignment {
            replica: name.into(),
            model: "demo".into(),
            engine: "sim".into(),
            source: "file:///m".into(),
            engine_args: vec![],
            gpus: gpus.to_vec(),
            adapters: vec![],
            engine_image: String::new(),
            traceparent: String::new(),
            gang: None,
            kv_transfer: None,
        }
    }

    #[test]
    fn a_changed_kv_transfer_role_replaces_the_engine() {
        let role = |r: &str| ReplicaAssignment {
            kv_transfer: Some(flotilla_api::pb::KvTransferAssignment { connector: "nixl".into(), role: r.into() }),
            ..a("r1", &[0])
        };
        assert_eq!(reconcile(&[role("decode")], &actual(&[role("decode")])), vec![Action::Keep("r1".into())]);
        assert_eq!(reconcile(&[role("decode")], &actual(&[role("prefill")])), vec![Action::Replace(role("decode"))]);
        assert_eq!(reconcile(&[a("r1", &[0])], &actual(&[role("prefill")])), vec![Action::Replace(a("r1", &[0]))]);
    }

    #[test]
    fn a_traceparent_is_not_part_of_the_engine() {
        // an adopted engine's saved assignment has none; the server's has one
        let traced = ReplicaAssignment {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            ..a("r1", &[0])
        };
        assert_eq!(
            reconcile(std::slice::from_ref(&traced), &actual(&[a("r1", &[0])])),
            vec![Action::Keep("r1".into())]
        );
        assert_eq!(reconcile(&[a("r1", &[0])], &actual(&[traced])), vec![Action::Keep("r1".into())]);
    }

    fn actual(items: &[ReplicaAssignment]) -> BTreeMap<String, ReplicaAssignment> {
        items.iter().map(|x| (x.replica.clone(), x.clone())).collect()
    }

    #[test]
    fn starts_missing_and_stops_unlisted() {
        let got = reconcile(&[a("r1", &[0]), a("r2", &[1])], &actual(&[a("r2", &[1]), a("r3", &[2])]));
        assert_eq!(got, vec![Action::Start(a("r1", &[0])), Action::Keep("r2".into()), Action::Stop("r3".into())]);
    }

    #[test]
    fn changed_assignment_is_replaced() {
        let got = reconcile(&[a("r1", &[1])], &actual(&[a("r1", &[0])]));
        assert_eq!(got, vec![Action::Replace(a("r1", &[1]))]);
    }

    #[test]
    fn adapter_changes_never_replace_the_engine() {
        let mut want = a("r1", &[0]);
        want.adapters = vec![AdapterAssignment { name: "sql".into(), source: "sim://sql".into() }];
        let have = actual(&[a("r1", &[0])]);
        assert_eq!(reconcile(std::slice::from_ref(&want), &have), vec![Action::UpdateAdapters(want.clone())]);
        assert!(same_engine(&want, &a("r1", &[0])));
        // Same adapters again: Keep. Engine change with adapter change: Replace.
        assert_eq!(reconcile(std::slice::from_ref(&want), &actual(&[want.clone()])), vec![Action::Keep("r1".into())]);
        let mut moved = want.clone();
        moved.gpus = vec![1];
        assert_eq!(reconcile(std::slice::from_ref(&moved), &have), vec![Action::Replace(moved.clone())]);
        assert!(!same_engine(&moved, &want));
    }

    #[test]
    fn empty_desired_stops_everything_and_repeats_are_idempotent() {
        let have = actual(&[a("r1", &[0]), a("r2", &[1])]);
        assert_eq!(reconcile(&[], &have), vec![Action::Stop("r1".into()), Action::Stop("r2".into())]);
        let want = [a("r1", &[0]), a("r2", &[1]), a("r1", &[5])];
        assert_eq!(reconcile(&want, &have), vec![Action::Keep("r1".into()), Action::Keep("r2".into())]);
        assert_eq!(reconcile(&[], &BTreeMap::new()), vec![]);
    }
}
