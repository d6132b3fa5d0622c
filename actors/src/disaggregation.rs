//! A disaggregated Model's member Models (pure): the model actor of a Model with
//! `spec.disaggregation` keeps `<name>-prefill` and `<name>-decode` equal to
//! [`ModelSpec::member`] of its spec, deletes them when the Model goes or stops being
//! disaggregated, and reports their counts as its own. Each member is an ordinary Model with
//! its own actor (replicas, rollout, autoscaling per role); the parent runs no replica itself.
//!
//! Only a Model labelled [`MEMBER_OF_LABEL`] = the parent's name is a member: one an operator
//! created under the same name is never overwritten or deleted (the parent's status says so).
//! A member edited directly is put back on the next reconcile: the parent's pools are the
//! source of truth (`flotilla scale` a role through the parent's spec).
//!
//! ```text
//!  parent spec ──member(role)──> wanted member spec ──vs stored──> create / update (CAS) / leave
//!  parent gone or not disaggregated ──────────────────────────────> delete labelled members
//! ```
use std::collections::BTreeMap;

use flotilla_api::spec::{member_name, EngineRole, MEMBER_OF_LABEL, ROLE_LABEL};
use flotilla_api::{Kind, ObjectName};
use flotilla_storage::Command;
use serde::{Deserialize, Serialize};

use crate::objects::{key, Condition, ModelStatus, ModelView};

/// The stored member Models of one parent, by role (read under their derived names).
pub type Members = BTreeMap<EngineRole, ModelView>;

/// Whether `m` was created as `parent`'s member.
pub fn is_member_of(m: &ModelView, parent: &ObjectName) -> bool {
    m.labels.get(MEMBER_OF_LABEL).is_some_and(|p| p == parent.as_str())
}

/// The writes that bring `parent`'s members to its spec (`parent` None: deleted), and the
/// problems that keep a member from being managed (a foreign Model holding its name).
pub fn member_writes(
    name: &ObjectName,
    parent: Option<&ModelView>,
    stored: &Members,
    uid: &mut dyn FnMut() -> String,
) -> (Vec<Command>, Vec<String>) {
    let (mut writes, mut problems) = (Vec::new(), Vec::new());
    for role in EngineRole::ALL {
        let current = stored.get(&role);
        if let Some(m) = current.filter(|m| !is_member_of(m, name)) {
            if parent.is_some_and(|p| p.spec.disaggregation.is_some()) {
                problems.push(format!("model {} exists and is not a member of {name}: rename one of them", m.name));
            }
            continue;
        }
        let wanted = parent.and_then(|p| p.spec.member(role));
        match (wanted, current) {
            (None, Some(m)) => {
                writes.push(Command::Delete { key: key(Kind::Model, &m.name), expected_revision: Some(m.revision) })
            }
            (None, None) => {}
            (Some(spec), current) => {
                let Ok(member) = member_name(name, role) else {
                    problems.push(format!("{name}-{} is not a valid model name", role.as_str()));
                    continue;
                };
                let labels = BTreeMap::from([
                    (MEMBER_OF_LABEL.to_owned(), name.to_string()),
                    (ROLE_LABEL.to_owned(), role.as_str().to_owned()),
                ]);
                if current.is_some_and(|m| m.spec == spec && m.labels == labels) {
                    continue;
                }
                writes.push(Command::Put {
                    key: key(Kind::Model, &member),
                    uid: uid(),
                    labels,
                    spec: serde_json::to_value(&spec).unwrap_or_default(),
                    expected_revision: Some(current.map_or(0, |m| m.revision)),
                });
            }
        }
    }
    (writes, problems)
}

/// One role's counts in a disaggregated Model's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleStatus {
    pub role: EngineRole,
    /// The member Model serving it.
    pub model: ObjectName,
    pub desired_replicas: u32,
    pub ready_replicas: u32,
}

/// A disaggregated Model's status: its members' counts summed, per role in `roles`, Ready
/// when every role is.
pub fn parent_status(name: &ObjectName, stored: &Members, problems: &[String]) -> ModelStatus {
    let mut roles = Vec::new();
    let mut parts = Vec::new();
    let mut all_ready = problems.is_empty();
    for role in EngineRole::ALL {
        let Some(m) = stored.get(&role).filter(|m| is_member_of(m, name)) else {
            all_ready = false;
            parts.push(format!("{} not created yet", role.as_str()));
            continue;
        };
        let s = ModelStatus::of(m);
        all_ready &= s.ready_replicas >= s.desired_replicas;
        parts.push(format!("{} {}/{} ready", role.as_str(), s.ready_replicas, s.desired_replicas));
        roles.push(RoleStatus {
            role,
            model: m.name.clone(),
            desired_replicas: s.desired_replicas,
            ready_replicas: s.ready_replicas,
        });
    }
    if let [p, d] = &roles[..] {
        // the ratio the pools run at now (Ready replicas), as operators size them: xPyD
        parts.push(format!("P:D {}:{}", p.ready_replicas, d.ready_replicas));
    }
    let message = if problems.is_empty() { parts.join(", ") } else { problems.join("; ") };
    let reason = match (problems.is_empty(), all_ready) {
        (false, _) => "MemberConflict",
        (true, true) => "AllRolesReady",
        (true, false) => "RolesNotReady",
    };
    let cond = |t: &str, ok: bool| Condition {
        type_: t.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.clone(),
    };
    ModelStatus {
        desired_replicas: roles.iter().map(|r| r.desired_replicas).sum(),
        ready_replicas: roles.iter().map(|r| r.ready_replicas).sum(),
        conditions: vec![cond("Ready", all_ready), cond("Progressing", !all_ready && problems.is_empty())],
        roles,
        ..ModelStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use flotilla_api::spec::{KvConnector, KvTransferRole, ModelSpec};
    use flotilla_api::Manifest;
    use serde_json::json;

    use super::*;

    fn view(yaml: &str, revision: u64) -> ModelView {
        let m = Manifest::parse(yaml).unwrap();
        let flotilla_api::spec::Spec::Model(spec) = m.spec else { panic!() };
        ModelView { name: m.metadata.name, revision, labels: m.metadata.labels, spec, status: json!({}) }
    }

    const PARENT: &str = "kind: Model\nmetadata: {name: llama}\nspec:\n  source: file:///m\n  engine: sim\n  \
        disaggregation: {connector: nixl, prefill: {replicas: 2}, decode: {replicas: 1}}\n";

    fn uid() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("uid-{n}")
        }
    }

    /// The member as the controller would have stored it.
    fn stored_member(parent: &ModelView, role: EngineRole, revision: u64) -> ModelView {
        let (w, _) = member_writes(&parent.name, Some(parent), &Members::new(), &mut uid());
        let i = EngineRole::ALL.iter().position(|r| *r == role).unwrap();
        let Command::Put { key, labels, spec, .. } = &w[i] else { panic!("{w:?}") };
        ModelView {
            name: key.name.clone(),
            revision,
            labels: labels.clone(),
            spec: serde_json::from_value::<ModelSpec>(spec.clone()).unwrap(),
            status: json!({}),
        }
    }

    #[test]
    fn creates_both_members_labelled_with_their_role() {
        let p = view(PARENT, 5);
        let (w, problems) = member_writes(&p.name, Some(&p), &Members::new(), &mut uid());
        assert!(problems.is_empty());
        assert_eq!(w.len(), 2);
        for (cmd, role) in w.iter().zip(EngineRole::ALL) {
            let Command::Put { key, labels, spec, expected_revision, .. } = cmd else { panic!("{cmd:?}") };
            assert_eq!(key.name.as_str(), format!("llama-{}", role.as_str()));
            assert_eq!(*expected_revision, Some(0), "create only if absent");
            assert_eq!(labels[MEMBER_OF_LABEL], "llama");
            assert_eq!(labels[ROLE_LABEL], role.as_str());
            let spec: ModelSpec = serde_json::from_value(spec.clone()).unwrap();
            assert_eq!(spec.kv_transfer, Some(KvTransferRole { connector: KvConnector::Nixl, role, colocate: None }));
            assert_eq!(spec.replicas, if role == EngineRole::Prefill { 2 } else { 1 });
        }
    }

    #[test]
    fn members_in_their_desired_state_cause_no_writes_and_edits_are_put_back() {
        let p = view(PARENT, 5);
        let mut members: Members = EngineRole::ALL.iter().map(|r| (*r, stored_member(&p, *r, 7))).collect();
        assert!(member_writes(&p.name, Some(&p), &members, &mut uid()).0.is_empty(), "no churn");
        members.get_mut(&EngineRole::Decode).unwrap().spec.replicas = 9; // scaled directly
        let (w, _) = member_writes(&p.name, Some(&p), &members, &mut uid());
        assert!(
            matches!(&w[..], [Command::Put { key, expected_revision: Some(7), .. }] if key.name.as_str() == "llama-decode"),
            "{w:?}"
        );
    }

    #[test]
    fn members_go_with_the_parent_or_its_disaggregation() {
        let p = view(PARENT, 5);
        let members: Members = EngineRole::ALL.iter().map(|r| (*r, stored_member(&p, *r, 7))).collect();
        let (gone, _) = member_writes(&p.name, None, &members, &mut uid());
        assert_eq!(gone.len(), 2);
        assert!(gone.iter().all(|c| matches!(c, Command::Delete { expected_revision: Some(7), .. })));
        let plain = view("kind: Model\nmetadata: {name: llama}\nspec: {source: file:///m}\n", 6);
        assert_eq!(member_writes(&p.name, Some(&plain), &members, &mut uid()).0.len(), 2);
    }

    #[test]
    fn a_foreign_model_under_a_member_name_is_left_alone_and_reported() {
        let p = view(PARENT, 5);
        let foreign = view("kind: Model\nmetadata: {name: llama-decode}\nspec: {source: file:///other}\n", 3);
        let members = Members::from([(EngineRole::Decode, foreign)]);
        let (w, problems) = member_writes(&p.name, Some(&p), &members, &mut uid());
        assert!(w.iter().all(|c| c.key().is_some_and(|k| k.name.as_str() == "llama-prefill")), "{w:?}");
        assert_eq!(problems.len(), 1, "{problems:?}");
        let s = parent_status(&p.name, &members, &problems);
        assert_eq!(s.conditions[0].reason, "MemberConflict");
        assert!(s.conditions[0].message.contains("llama-decode exists"), "{:?}", s.conditions);
        // deleting the parent never deletes it either
        assert!(member_writes(&p.name, None, &members, &mut uid()).0.is_empty());
    }

    #[test]
    fn the_parent_reports_its_roles() {
        let p = view(PARENT, 5);
        let mut members: Members = EngineRole::ALL.iter().map(|r| (*r, stored_member(&p, *r, 7))).collect();
        members.get_mut(&EngineRole::Prefill).unwrap().status =
            json!({"desired_replicas": 2, "ready_replicas": 2, "conditions": []});
        members.get_mut(&EngineRole::Decode).unwrap().status =
            json!({"desired_replicas": 1, "ready_replicas": 0, "conditions": []});
        let s = parent_status(&p.name, &members, &[]);
        assert_eq!((s.desired_replicas, s.ready_replicas), (3, 2));
        assert_eq!(s.conditions[0].status, "False");
        assert_eq!(s.conditions[0].message, "prefill 2/2 ready, decode 0/1 ready, P:D 2:0");
        members.get_mut(&EngineRole::Decode).unwrap().status =
            json!({"desired_replicas": 1, "ready_replicas": 1, "conditions": []});
        let s = parent_status(&p.name, &members, &[]);
        assert_eq!((s.conditions[0].status.as_str(), s.conditions[0].reason.as_str()), ("True", "AllRolesReady"));
        assert_eq!(s.roles.len(), 2);
    }
}
