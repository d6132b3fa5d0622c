//! What to do about one federated object's member (a FederatedModel's Model, a
//! FederatedAdapter's Adapter) in one cluster. Pure: the desired spec (None: the cluster
//! should not hold it) against what the member cluster holds.
//!
//! The federation owns only objects labelled [`FEDERATED_BY_LABEL`] with its federated
//! object's name: one of the same name made by someone else is a conflict, reported and
//! never touched. Every write is a compare-and-set on the revision just read, so a local change
//! made in between is not overwritten blind (the next tick reads it and decides again), and
//! a member already as desired is left alone: no write, no churn, whatever the federation
//! did before it restarted or lost leadership.
use std::collections::BTreeMap;

use flotilla_api::spec::FEDERATED_BY_LABEL;

/// A Model or Adapter in a member cluster, as its API returned it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberObject {
    pub labels: BTreeMap<String, String>,
    pub spec: serde_json::Value,
    pub status: serde_json::Value,
    pub revision: u64,
}

impl MemberObject {
    /// The FederatedModel that keeps it, if any.
    pub fn federated_by(&self) -> Option<&str> {
        self.labels.get(FEDERATED_BY_LABEL).map(String::as_str)
    }

    /// Its replicas as asked (`spec.replicas`) and Ready (`status.ready_replicas`).
    pub fn counts(&self) -> (u32, u32) {
        let n = |v: &serde_json::Value| v.as_u64().map_or(0, |n| n.min(u64::from(u32::MAX)) as u32);
        (n(&self.spec["replicas"]), n(&self.status["ready_replicas"]))
    }
}

/// One write to a member cluster, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Already as desired (or absent and not wanted).
    Nothing,
    /// Create it (compare-and-set on "absent").
    Create,
    /// Replace its spec (compare-and-set on this revision).
    Update { revision: u64 },
    /// Delete it (compare-and-set on this revision).
    Delete { revision: u64 },
    /// A Model of that name that the federation does not own: left alone.
    Conflict(String),
}

/// The action that brings `observed` (the member cluster's object of the federated object's
/// name, if any) to `desired` for federated object `fed`.
pub fn action(fed: &str, desired: Option<&serde_json::Value>, observed: Option<&MemberObject>) -> Action {
    match (desired, observed) {
        (None, None) => Action::Nothing,
        (_, Some(m)) if m.federated_by() != Some(fed) => match desired {
            None => Action::Nothing,
            Some(_) => Action::Conflict(match m.federated_by() {
                Some(other) => format!("its {fed:?} is kept by the federation's {other:?}"),
                None => format!("it has a {fed:?} the federation did not create (no {FEDERATED_BY_LABEL} label)"),
            }),
        },
        (None, Some(m)) => Action::Delete { revision: m.revision },
        (Some(_), None) => Action::Create,
        (Some(want), Some(m)) if *want == m.spec => Action::Nothing,
        (Some(_), Some(m)) => Action::Update { revision: m.revision },
    }
}

/// The manifest of member object `kind`/`name` with `spec`, labelled for federated object
/// `fed` (JSON, which the member's YAML parser reads).
pub fn manifest(kind: &str, name: &str, fed: &str, spec: &serde_json::Value) -> String {
    serde_json::json!({
        "kind": kind,
        "metadata": {"name": name, "labels": {FEDERATED_BY_LABEL: fed}},
        "spec": spec,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn member(fed: Option<&str>, replicas: u32, revision: u64) -> MemberObject {
        MemberObject {
            labels: fed.map(|f| (FEDERATED_BY_LABEL.to_string(), f.to_string())).into_iter().collect(),
            spec: json!({"source": "file:///m", "replicas": replicas}),
            status: json!({"ready_replicas": 1}),
            revision,
        }
    }

    #[test]
    fn owned_members_are_created_updated_deleted_or_left_alone() {
        let want = json!({"source": "file:///m", "replicas": 3});
        assert_eq!(action("llm", Some(&want), None), Action::Create);
        assert_eq!(action("llm", Some(&want), Some(&member(Some("llm"), 3, 7))), Action::Nothing, "no churn");
        assert_eq!(action("llm", Some(&want), Some(&member(Some("llm"), 2, 7))), Action::Update { revision: 7 });
        assert_eq!(action("llm", None, Some(&member(Some("llm"), 2, 9))), Action::Delete { revision: 9 });
        assert_eq!(action("llm", None, None), Action::Nothing);
        assert_eq!(member(Some("llm"), 2, 9).counts(), (2, 1));
    }

    #[test]
    fn a_model_the_federation_does_not_own_is_never_touched() {
        let want = json!({"replicas": 3});
        let local = member(None, 1, 4);
        assert!(
            matches!(action("llm", Some(&want), Some(&local)), Action::Conflict(m) if m.contains("did not create"))
        );
        assert_eq!(action("llm", None, Some(&local)), Action::Nothing, "not deleted either");
        let other = member(Some("other"), 1, 4);
        assert!(matches!(action("llm", Some(&want), Some(&other)), Action::Conflict(m) if m.contains("\"other\"")));
    }

    #[test]
    fn manifests_carry_the_ownership_label() {
        let m: serde_json::Value =
            serde_json::from_str(&manifest("Model", "llm", "llm", &json!({"replicas": 2}))).unwrap();
        assert_eq!(m["metadata"]["labels"][FEDERATED_BY_LABEL], "llm");
        assert_eq!(m["spec"]["replicas"], 2);
    }
}
