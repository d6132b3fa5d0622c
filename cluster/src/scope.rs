//! Operators limited to some objects: a token made with `--selector team=search` carries
//! the selector in its identity (`Identity::scope`), and every object that identity writes
//! must match it both before the write (it cannot take over another team's object) and
//! after (it cannot move one out of, or create one outside, its scope). The object service
//! reads the object linearizably, checks it here, and pins the write to the revision it
//! read, so a concurrent relabelling between the check and the write is a conflict, never a
//! write outside the scope.
use std::collections::BTreeMap;

use flotilla_api::{LabelSelector, ObjectKey};
use flotilla_security::Identity;
use tonic::Status;

/// Whether `identity`, limited to `selector`, may change `key` from `before` (None: absent)
/// to `after` (None: deleted) (pure).
pub(crate) fn check(
    identity: &Identity,
    selector: &LabelSelector,
    key: &ObjectKey,
    before: Option<&BTreeMap<String, String>>,
    after: Option<&BTreeMap<String, String>>,
) -> Result<(), Status> {
    let scope = identity.scope.as_deref().unwrap_or_default();
    let refuse = |when: &str, labels: &BTreeMap<String, String>| {
        let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        Err(Status::permission_denied(format!(
            "{identity} is limited to objects labelled {scope}; {key} {when} has labels {{{}}}",
            shown.join(",")
        )))
    };
    if let Some(labels) = before.filter(|l| !selector.matches(l)) {
        return refuse("as it is", labels);
    }
    if let Some(labels) = after.filter(|l| !selector.matches(l)) {
        return refuse("as written", labels);
    }
    Ok(())
}

/// The selector of a scoped identity; a selector that does not parse (it was checked when
/// the token was made, so only a bug gets here) refuses everything.
pub(crate) fn selector_of(identity: &Identity) -> Result<Option<LabelSelector>, Status> {
    identity
        .scope
        .as_deref()
        .map(|s| LabelSelector::parse(s).map_err(|e| Status::permission_denied(format!("{identity}'s scope: {e}"))))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::Kind;
    use flotilla_security::Role;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_scoped_write_must_match_before_and_after() {
        let id = Identity::new(Role::Operator, "ci").unwrap().with_scope("team=search");
        let sel = selector_of(&id).unwrap().unwrap();
        let key = ObjectKey { kind: Kind::Model, name: "m".parse().unwrap() };
        let (ours, theirs, none) = (labels(&[("team", "search"), ("x", "y")]), labels(&[("team", "ads")]), labels(&[]));
        // (before, after, allowed)
        let table = [
            (None, Some(&ours), true),           // create inside the scope
            (None, Some(&none), false),          // create outside it
            (Some(&ours), Some(&ours), true),    // update inside
            (Some(&ours), Some(&theirs), false), // move out
            (Some(&theirs), Some(&ours), false), // take over
            (Some(&ours), None, true),           // delete ours
            (Some(&theirs), None, false),        // delete theirs
            (None, None, true),                  // delete of nothing: the store says not found
        ];
        for (i, (before, after, allowed)) in table.into_iter().enumerate() {
            let r = check(&id, &sel, &key, before, after);
            assert_eq!(r.is_ok(), allowed, "row {i}: {r:?}");
            if let Err(s) = r {
                assert_eq!(s.code(), tonic::Code::PermissionDenied);
                assert!(s.message().contains("limited to objects labelled team=search"), "{}", s.message());
            }
        }
        assert!(selector_of(&Identity::new(Role::Operator, "all").unwrap()).unwrap().is_none());
    }
}
