//! Test support for the pure decisions: a real in-memory `flotilla_storage::Store` that
//! commands are applied to, with builders for nodes, models and replicas.
use std::collections::BTreeMap;

use flotilla_api::spec::{Gpu, ModelSpec, NodeSpec, NodeState, NodeStatus, ReplicaPhase, ReplicaSpec, ReplicaStatus};
use flotilla_api::{Kind, LabelSelector, ObjectName, StoredObject};
use flotilla_storage::{Command, CommandResult, Store, TxnOp};
use serde_json::json;

use crate::objects::{key, Fresh, ModelView, NodeView, ReplicaView, MODEL_LABEL};

pub fn name(s: &str) -> ObjectName {
    s.parse().expect("valid name")
}

/// Deterministic names and uids: `00000`, `00001`, ...
#[derive(Default)]
pub struct Counter(u32);

impl Counter {
    /// A counter whose next suffix is `n + 1`.
    pub fn after(n: u32) -> Counter {
        Counter(n)
    }
}

impl Fresh for Counter {
    fn suffix(&mut self) -> String {
        self.0 += 1;
        format!("{:05}", self.0)
    }
    fn uid(&mut self) -> String {
        format!("uid-{}", self.0)
    }
}

pub struct World {
    pub store: Store,
}

impl Default for World {
    fn default() -> Self {
        World { store: Store::new(100_000) }
    }
}

impl World {
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        self.store.apply(cmd)
    }

    /// Applies every command, asserting none conflicts.
    pub fn apply_all(&mut self, cmds: &[Command]) {
        for c in cmds {
            let r = self.apply(c);
            assert!(
                matches!(r, CommandResult::Txn { .. } | CommandResult::Put { .. } | CommandResult::Deleted { .. }),
                "{r:?} for {c:?}"
            );
        }
    }

    pub(crate) fn put(
        &mut self,
        kind: Kind,
        n: &str,
        labels: BTreeMap<String, String>,
        spec: serde_json::Value,
        status: serde_json::Value,
    ) {
        let op = TxnOp::Put { key: key(kind, &name(n)), uid: format!("uid-{n}"), labels, spec, status: Some(status) };
        self.apply_all(&[Command::Txn { compares: vec![], ops: vec![op] }]);
    }

    pub fn node(&mut self, n: &str, gpus: u32, gpu_type: &str) {
        let spec = NodeSpec {
            address: "127.0.0.1".into(),
            gpus: (0..gpus).map(|index| Gpu { index, gpu_type: gpu_type.into(), memory_mib: 81_920 }).collect(),
            agent_id: format!("agent-{n}"),
            cordoned: false,
            draining: false,
        };
        let status = NodeStatus { state: NodeState::Ready, ..NodeStatus::default() };
        self.put(Kind::Node, n, BTreeMap::new(), json!(spec), json!(status));
    }

    pub fn set_node(&mut self, n: &str, f: impl FnOnce(&mut NodeSpec, &mut NodeStatus)) {
        let mut v = self.get_node(n);
        f(&mut v.spec, &mut v.status);
        self.put(Kind::Node, n, v.labels, json!(v.spec), json!(v.status));
    }

    pub fn model(&mut self, n: &str, replicas: u32, gpus: u32) {
        let spec = ModelSpec {
            disaggregation: None,
            kv_transfer: None,
            engine_image: Default::default(),
            topology: None,
            engine: flotilla_api::spec::EngineKind::Sim,
            source: format!("file:///models/{n}"),
            replicas,
            gpus,
            gpu_types: vec![],
            engine_args: vec![],
            routing: Default::default(),
            autoscaling: None,
            rollout: Default::default(),
        };
        self.put(Kind::Model, n, BTreeMap::new(), json!(spec), serde_json::Value::Null);
    }

    pub fn replica(&mut self, n: &str, model: &str, gpus: u32, phase: ReplicaPhase, node: Option<(&str, Vec<u32>)>) {
        let spec = ReplicaSpec {
            kv_transfer: None,
            engine_image: Default::default(),
            topology: None,
            members: Vec::new(),
            model: name(model),
            engine: flotilla_api::spec::EngineKind::Sim,
            source: format!("file:///models/{model}"),
            engine_args: vec![],
            gpus_needed: gpus,
            gpu_types: vec![],
            node: node.as_ref().map(|(nn, _)| name(nn)),
            gpus: node.as_ref().map(|(_, g)| g.clone()).unwrap_or_default(),
            adapters: vec![],
            template_hash: String::new(),
        };
        let status = ReplicaStatus {
            phase,
            endpoint: (phase == ReplicaPhase::Ready).then(|| "127.0.0.1:9000".into()),
            ..ReplicaStatus::default()
        };
        let labels = BTreeMap::from([(MODEL_LABEL.to_owned(), model.to_owned())]);
        self.put(Kind::Replica, n, labels, json!(spec), json!(status));
        if let Some((nn, gpus)) = node {
            if phase != ReplicaPhase::Failed {
                self.set_node(nn, |_, st| {
                    for g in gpus {
                        st.allocations.insert(g, name(n));
                    }
                });
            }
        }
    }

    /// A gang replica of `model` bound to `members` (node, GPUs) in rank order, with its
    /// GPUs allocated on every member's node.
    pub fn gang(&mut self, n: &str, model: &str, phase: ReplicaPhase, members: &[(&str, Vec<u32>)]) {
        let per_node = members[0].1.len() as u32;
        self.replica(n, model, per_node, phase, Some((members[0].0, members[0].1.clone())));
        let topology = flotilla_api::spec::Topology {
            nodes: members.len() as u32,
            gpus_per_node: per_node,
            layout: Default::default(),
            placement: Default::default(),
            domain_label: flotilla_api::spec::DEFAULT_DOMAIN_LABEL.into(),
        };
        self.replicas_mut(n, |spec, _| {
            spec.topology = Some(topology);
            spec.members = members
                .iter()
                .map(|(node, gpus)| flotilla_api::spec::GangMember { node: name(node), gpus: gpus.clone() })
                .collect();
        });
        if phase != ReplicaPhase::Failed {
            for (node, gpus) in &members[1..] {
                self.set_node(node, |_, st| {
                    for g in gpus {
                        st.allocations.insert(*g, name(n));
                    }
                });
            }
        }
    }

    fn objects(&self, kind: Kind) -> Vec<StoredObject> {
        self.store.list(kind, &LabelSelector::default())
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        self.objects(Kind::Node).iter().map(|o| NodeView::from_stored(o).expect("node")).collect()
    }

    pub fn get_node(&self, n: &str) -> NodeView {
        NodeView::from_stored(self.store.get(&key(Kind::Node, &name(n))).expect("node exists")).expect("node")
    }

    pub fn replicas(&self) -> Vec<ReplicaView> {
        self.objects(Kind::Replica).iter().map(|o| ReplicaView::from_stored(o).expect("replica")).collect()
    }

    pub fn get_model(&self, n: &str) -> Option<ModelView> {
        self.store.get(&key(Kind::Model, &name(n))).map(|o| ModelView::from_stored(o).expect("model"))
    }

    /// Asserts that node allocations and replica bindings agree and no GPU is bound twice.
    /// A Draining gang may hold only some of its members' GPUs (each member's node frees its
    /// own as its agent stops it; a lost node's at once), so only its allocations are checked.
    pub fn assert_consistent(&self) {
        let nodes = self.nodes();
        let draining_gang = |r: &ReplicaView| r.phase() == ReplicaPhase::Draining && !r.spec.members.is_empty();
        let whole = |r: &ReplicaView| r.phase() != ReplicaPhase::Failed && !draining_gang(r);
        for r in self.replicas().into_iter().filter(whole) {
            for (n, gpus) in r.spec.bindings() {
                let node = nodes.iter().find(|x| &x.name == n).expect("bound node exists");
                for g in gpus {
                    assert_eq!(node.status.allocations.get(g), Some(&r.name), "gpu {g} of {n} for {}", r.name);
                }
            }
        }
        for n in &nodes {
            for (g, r) in &n.status.allocations {
                let failed = self.replicas().into_iter().any(|x| &x.name == r && x.phase() == ReplicaPhase::Failed);
                assert!(!failed, "gpu {g} of {} still allocated to {r}, which Failed", n.name);
                assert!(n.spec.gpus.iter().any(|x| x.index == *g), "allocated gpu {g} exists on {}", n.name);
                let rep = self.replicas().into_iter().find(|x| &x.name == r);
                let rep = rep.unwrap_or_else(|| panic!("gpu {g} of {} bound to missing replica {r}", n.name));
                let held = rep.spec.bindings().into_iter().any(|(on, gpus)| on == &n.name && gpus.contains(g));
                assert!(held, "gpu {g} of {} allocated to {r}, which does not hold it", n.name);
            }
        }
    }
}

impl World {
    pub fn set_model_replicas(&mut self, n: &str, replicas: u32) {
        self.set_model(n, |spec| spec.replicas = replicas);
    }

    /// Changes a model's spec, keeping its labels and status.
    pub fn set_model(&mut self, n: &str, f: impl FnOnce(&mut ModelSpec)) {
        let m = self.get_model(n).expect("model");
        let mut spec = m.spec.clone();
        f(&mut spec);
        self.put(Kind::Model, n, m.labels, json!(spec), m.status);
    }

    /// Applies every command; false if any was refused.
    pub fn apply_all_ok(&mut self, cmds: &[Command]) -> bool {
        cmds.iter().all(|c| {
            matches!(
                self.apply(c),
                CommandResult::Txn { .. } | CommandResult::Put { .. } | CommandResult::Deleted { .. }
            )
        })
    }

    pub fn replicas_mut(&mut self, n: &str, f: impl FnOnce(&mut ReplicaSpec, &mut ReplicaStatus)) {
        let mut r = self.replicas().into_iter().find(|r| r.name == name(n)).expect("replica");
        f(&mut r.spec, &mut r.status);
        self.put(Kind::Replica, n, r.labels, json!(r.spec), json!(r.status));
    }
}
