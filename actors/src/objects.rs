//! Typed views of the stored objects the controllers work on (Model, Node, Replica), the
//! Model status document, replica naming, and the small builders of Raft commands that
//! every controller shares.
use std::collections::{BTreeMap, HashMap};

use flotilla_api::spec::{ModelSpec, NodeSpec, NodeStatus, ReplicaPhase, ReplicaSpec, ReplicaStatus};
use flotilla_api::{Kind, ObjectKey, ObjectName, StoredObject};
use flotilla_storage::{Command, Compare, TxnOp};
use serde::{Deserialize, Serialize};

use crate::ActorsError;

/// Label naming the model a replica serves (selected with `LabelSelector::for_model`).
pub use flotilla_api::selector::MODEL_LABEL;
/// Model label asking for spread placement instead of the configured default.
pub const PLACEMENT_LABEL: &str = "flotilla.io/placement";
/// Replica label holding the W3C traceparent of the controller decision that created it
/// (only when that decision was traced): the binding and the agent's start continue it.
/// A label, not a spec field, so servers of an older version read such replicas unchanged.
pub const TRACE_LABEL: &str = "flotilla.io/traceparent";

pub fn key(kind: Kind, name: &ObjectName) -> ObjectKey {
    ObjectKey { kind, name: name.clone() }
}

fn parse<T: serde::de::DeserializeOwned>(
    o: &StoredObject,
    v: &serde_json::Value,
    part: &str,
) -> Result<T, ActorsError> {
    let v = if v.is_null() && part == "status" { serde_json::json!({}) } else { v.clone() };
    serde_json::from_value(v)
        .map_err(|e| ActorsError::Malformed { key: o.key.to_string(), why: format!("{part}: {e}") })
}

fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    // Plain structs of strings, numbers, lists and string-keyed maps always serialize.
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// A `Model` as the controllers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelView {
    pub name: ObjectName,
    pub revision: u64,
    pub labels: BTreeMap<String, String>,
    pub spec: ModelSpec,
    pub status: serde_json::Value,
}

impl ModelView {
    pub fn from_stored(o: &StoredObject) -> Result<ModelView, ActorsError> {
        Ok(ModelView {
            name: o.key.name.clone(),
            revision: o.revision,
            labels: o.labels.clone(),
            spec: parse(o, &o.spec, "spec")?,
            status: o.status.clone(),
        })
    }
}

/// A `Node`: spec (what the agent registered, plus cordon/drain) and status (state and the
/// GPU allocation).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: ObjectName,
    pub revision: u64,
    pub labels: BTreeMap<String, String>,
    pub spec: NodeSpec,
    pub status: NodeStatus,
}

impl NodeView {
    /// Whether it still holds GPUs for `replica`.
    pub fn holds(&self, replica: &ObjectName) -> bool {
        self.status.allocations.values().any(|r| r == replica)
    }

    pub fn from_stored(o: &StoredObject) -> Result<NodeView, ActorsError> {
        Ok(NodeView {
            name: o.key.name.clone(),
            revision: o.revision,
            labels: o.labels.clone(),
            spec: parse(o, &o.spec, "spec")?,
            status: parse(o, &o.status, "status")?,
        })
    }

    pub fn key(&self) -> ObjectKey {
        key(Kind::Node, &self.name)
    }

    pub fn compare(&self) -> Compare {
        Compare { key: self.key(), revision: self.revision }
    }

    pub fn status_op(&self, status: &NodeStatus) -> TxnOp {
        TxnOp::PutStatus { key: self.key(), status: to_json(status) }
    }

    /// Healthy GPUs not bound to any replica.
    pub fn free_gpus(&self) -> usize {
        self.status.free_gpus(&self.spec).count()
    }
}

/// A `Replica`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaView {
    pub name: ObjectName,
    pub revision: u64,
    pub create_revision: u64,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub spec: ReplicaSpec,
    pub status: ReplicaStatus,
}

impl ReplicaView {
    pub fn from_stored(o: &StoredObject) -> Result<ReplicaView, ActorsError> {
        Ok(ReplicaView {
            name: o.key.name.clone(),
            revision: o.revision,
            create_revision: o.create_revision,
            uid: o.uid.clone(),
            labels: o.labels.clone(),
            spec: parse(o, &o.spec, "spec")?,
            status: parse(o, &o.status, "status")?,
        })
    }

    pub fn key(&self) -> ObjectKey {
        key(Kind::Replica, &self.name)
    }

    pub fn compare(&self) -> Compare {
        Compare { key: self.key(), revision: self.revision }
    }

    pub fn phase(&self) -> ReplicaPhase {
        self.status.phase
    }

    /// The op that writes `spec` and `status` of this replica.
    pub fn put_op(&self, spec: &ReplicaSpec, status: &ReplicaStatus) -> TxnOp {
        TxnOp::Put {
            key: self.key(),
            uid: self.uid.clone(),
            labels: self.labels.clone(),
            spec: to_json(spec),
            status: Some(to_json(status)),
        }
    }

    pub fn status_op(&self, status: &ReplicaStatus) -> TxnOp {
        TxnOp::PutStatus { key: self.key(), status: to_json(status) }
    }

    /// Whether it holds GPUs on `node` (its node, or a gang member's).
    pub fn binds(&self, node: &ObjectName) -> bool {
        self.rank_on(node).is_some()
    }

    /// Its member rank on `node` (0 for a one-node replica's node), if it binds GPUs there.
    pub fn rank_on(&self, node: &ObjectName) -> Option<usize> {
        self.spec.bindings().iter().position(|(n, _)| *n == node)
    }

    /// The views, among `nodes`, of its other members' nodes (not `node`) that still hold
    /// GPUs for it: a gang is gone only once none does.
    pub fn held_elsewhere<'a>(&self, node: &ObjectName, nodes: &'a HashMap<ObjectName, NodeView>) -> Vec<&'a NodeView> {
        self.spec
            .bindings()
            .into_iter()
            .filter(|(n, _)| *n != node)
            .filter_map(|(n, _)| nodes.get(n))
            .filter(|v| v.holds(&self.name))
            .collect()
    }

    /// Whether the agent should run it: bound and not on its way out.
    pub fn assigned(&self) -> bool {
        self.spec.node.is_some()
            && matches!(self.phase(), ReplicaPhase::Scheduled | ReplicaPhase::Starting | ReplicaPhase::Ready)
    }
}

/// A fresh replica object for `model`, Pending.
pub fn new_replica_op(model: &ModelView, suffix: &str, uid: String) -> (ObjectName, TxnOp) {
    let name = replica_name(&model.name, suffix);
    let spec = ReplicaSpec {
        model: model.name.clone(),
        engine: model.spec.engine,
        source: model.spec.source.clone(),
        engine_args: model.spec.engine_args.clone(),
        // a gang's members each need their share
        gpus_needed: model.spec.topology.as_ref().map_or(model.spec.gpus, |t| t.gpus_per_node),
        gpu_types: model.spec.gpu_types.clone(),
        node: None,
        gpus: Vec::new(),
        adapters: Vec::new(),
        template_hash: model.spec.template().hash(),
        engine_image: model.spec.engine_image.clone(),
        topology: model.spec.topology.clone(),
        members: Vec::new(),
        kv_transfer: model.spec.kv_transfer.clone(),
    };
    let labels = BTreeMap::from([(MODEL_LABEL.to_owned(), model.name.to_string())]);
    let op = TxnOp::Put {
        key: key(Kind::Replica, &name),
        uid,
        labels,
        spec: to_json(&spec),
        status: Some(to_json(&ReplicaStatus::default())),
    };
    (name, op)
}

/// `<model>-<suffix>`, shortening the model part so the result stays a DNS label.
pub fn replica_name(model: &ObjectName, suffix: &str) -> ObjectName {
    let room = 63usize.saturating_sub(suffix.len() + 1);
    let base: &str = &model.as_str()[..model.as_str().len().min(room)];
    let base = base.trim_end_matches('-');
    format!("{base}-{suffix}").parse().unwrap_or_else(|_| model.clone())
}

/// Five random lowercase letters and digits.
pub fn random_suffix() -> String {
    use rand::Rng;
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..5).map(|_| ALNUM[rng.random_range(0..ALNUM.len())] as char).collect()
}

/// Source of replica name suffixes and uids: random in the actors, a counter in tests.
pub trait Fresh {
    fn suffix(&mut self) -> String;
    fn uid(&mut self) -> String;
}

/// Random names and v4 uids.
pub struct RandomFresh;

impl Fresh for RandomFresh {
    fn suffix(&mut self) -> String {
        random_suffix()
    }
    fn uid(&mut self) -> String {
        uuid::Uuid::new_v4().to_string()
    }
}

/// One condition of a model's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True" or "False".
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// The status of a `Model`, written by its actor (the `autoscaling` part by its
/// autoscaler; each writer keeps the other's part as stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelStatus {
    pub desired_replicas: u32,
    pub ready_replicas: u32,
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// The rollout of the current template (written by the model actor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::rollout::RolloutStatus>,
    /// Templates the model has run, oldest first, at most `rollout::TEMPLATE_HISTORY`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<crate::rollout::TemplateRecord>,
    /// A disaggregated Model's roles, each served by a member Model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<crate::disaggregation::RoleStatus>,
}

impl ModelStatus {
    /// The stored status of a model (defaults for a missing or older document).
    pub fn of(model: &ModelView) -> ModelStatus {
        serde_json::from_value(model.status.clone()).unwrap_or_default()
    }
}

/// One metric the autoscaler steers on, as last evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricStatus {
    pub name: String,
    /// `None`: unknown (no samples, or a replica's metrics missing).
    pub value: Option<f64>,
    pub target: f64,
}

/// One change of the desired replica count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingEvent {
    /// Unix time in ms.
    pub at_ms: u64,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// The autoscaler's part of a model's status: its desired count (what the model actor
/// keeps), the metrics against their targets and the last decisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AutoscalingStatus {
    pub desired_replicas: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default)]
    pub metrics: Vec<MetricStatus>,
    /// Newest last, at most [`SCALING_HISTORY`] entries.
    #[serde(default)]
    pub history: Vec<ScalingEvent>,
    /// When the metrics were evaluated (unix ms).
    #[serde(default)]
    pub evaluated_at_ms: u64,
}

/// Scaling events kept in a model's status.
pub const SCALING_HISTORY: usize = 20;

impl ModelStatus {
    pub fn to_json(&self) -> serde_json::Value {
        to_json(self)
    }
}

/// A note about `object` (`kind/name`) by the model controller, stamped when proposed.
pub fn note(object: String, reason: &str, message: String) -> flotilla_storage::eventlog::Note {
    flotilla_storage::eventlog::Note { object, reason: reason.into(), message, by: "controller/model".into(), at_ms: 0 }
}

/// `cmd` with `notes` kept in the event log when it takes effect (`cmd` alone when none).
pub fn recorded(cmd: Command, notes: Vec<flotilla_storage::eventlog::Note>) -> Command {
    if notes.is_empty() {
        cmd
    } else {
        Command::Recorded { notes, command: Box::new(cmd) }
    }
}

/// The ops of a transaction (through a [`recorded`] wrapper); none for other commands.
pub fn txn_ops(c: &Command) -> &[TxnOp] {
    match c {
        Command::Txn { ops, .. } => ops,
        Command::Recorded { command, .. } => txn_ops(command),
        _ => &[],
    }
}

/// Labels every replica `cmds` create with `traceparent` ([`TRACE_LABEL`]).
pub fn label_traced(cmds: &mut [Command], traceparent: &str) {
    fn ops(c: &mut Command) -> &mut [TxnOp] {
        match c {
            Command::Txn { ops, .. } => ops,
            Command::Recorded { command, .. } => ops(command),
            _ => &mut [],
        }
    }
    for op in cmds.iter_mut().flat_map(ops) {
        if let TxnOp::Put { key, labels, .. } = op {
            if key.kind == Kind::Replica {
                labels.insert(TRACE_LABEL.to_owned(), traceparent.to_owned());
            }
        }
    }
}

/// A transaction, or nothing when it has no ops.
pub fn txn(compares: Vec<Compare>, ops: Vec<TxnOp>) -> Option<Command> {
    (!ops.is_empty()).then_some(Command::Txn { compares, ops })
}

/// Removes every allocation to one of `replicas` from `status`; true if any was removed.
pub fn release(status: &mut NodeStatus, replicas: &[&ObjectName]) -> bool {
    let before = status.allocations.len();
    status.allocations.retain(|_, r| !replicas.contains(&&*r));
    status.allocations.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traced_decision_labels_only_the_replicas_it_creates() {
        let r = |n: &str| key(Kind::Replica, &n.parse().unwrap());
        let put = |k: ObjectKey| TxnOp::Put {
            key: k,
            uid: "u".into(),
            labels: BTreeMap::from([(MODEL_LABEL.to_owned(), "m".to_owned())]),
            spec: serde_json::json!({}),
            status: None,
        };
        let mut cmds = vec![
            recorded(Command::Txn { compares: vec![], ops: vec![put(r("a"))] }, vec![]),
            Command::Txn {
                compares: vec![],
                ops: vec![put(key(Kind::Model, &"m".parse().unwrap())), put(r("b")), TxnOp::Delete { key: r("c") }],
            },
        ];
        label_traced(&mut cmds, "tp");
        let labelled: Vec<String> = cmds
            .iter()
            .flat_map(txn_ops)
            .filter_map(|op| match op {
                TxnOp::Put { key, labels, .. } if labels.get(TRACE_LABEL).is_some_and(|v| v == "tp") => {
                    Some(key.name.to_string())
                }
                _ => None,
            })
            .collect();
        assert_eq!(labelled, ["a", "b"]);
    }

    #[test]
    fn replica_names_are_dns_labels() {
        let m: ObjectName = "llama".parse().unwrap();
        assert_eq!(replica_name(&m, "ab1cd").as_str(), "llama-ab1cd");
        let long: ObjectName = format!("{}-x", "a".repeat(59)).parse().unwrap();
        let n = replica_name(&long, "zzzzz");
        assert!(n.as_str().len() <= 63 && n.as_str().ends_with("-zzzzz"), "{n}");
        let s = random_suffix();
        assert_eq!(s.len(), 5);
        assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    }

    #[test]
    fn model_status_json_shape() {
        let s = ModelStatus {
            autoscaling: None,
            roles: vec![],
            rollout: None,
            templates: vec![],
            desired_replicas: 2,
            ready_replicas: 1,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "Unschedulable".into(),
                message: "m".into(),
            }],
        };
        let j = s.to_json();
        assert_eq!(j["desired_replicas"], 2);
        assert_eq!(j["conditions"][0]["type"], "Ready");
    }
}
