//! Node facts read in one place for every controller that asks "does this replica's node
//! still count?": a node is down when it is NotReady or missing (deleted, or unreadable),
//! and draining when its spec says so; its Failed GPUs are in its status
//! (`unhealthy_gpus`, `gpu_health`): replicas bound to them are moved. The model actor, the adapter controller, the
//! autoscaler and `AdapterService` read them here rather than each its own way.
//!
//! ```text
//!  replicas ──their nodes──> lookup (state machine) ──> BoundNodes { down, draining, failed_gpus }
//! ```
use std::collections::{BTreeMap, BTreeSet, HashMap};

use flotilla_api::spec::NodeState;
use flotilla_api::{Kind, ObjectName};
use flotilla_storage::StoreReader;

use crate::objects::{key, NodeView, ReplicaView};

/// Whether a node, as stored (`None`: missing or unreadable), is down: its replicas do not
/// count as serving.
pub fn is_down(node: Option<&NodeView>) -> bool {
    node.is_none_or(|v| v.status.state == NodeState::NotReady)
}

/// The stored node `name`, if it exists and parses.
pub fn read_node(reader: &StoreReader, name: &ObjectName) -> Option<NodeView> {
    reader.get(&key(Kind::Node, name)).0.and_then(|o| NodeView::from_stored(&o).ok())
}

/// The stored nodes, other than `except`, that the gangs among `replicas` have members on
/// (a heartbeat's or a lost node's decision frees and compares them too).
pub fn member_nodes<'a>(
    reader: &StoreReader,
    replicas: impl IntoIterator<Item = &'a ReplicaView>,
    except: &ObjectName,
) -> HashMap<ObjectName, NodeView> {
    let names: BTreeSet<&ObjectName> =
        replicas.into_iter().flat_map(|r| r.spec.members.iter().map(|m| &m.node)).filter(|n| *n != except).collect();
    names.into_iter().filter_map(|n| read_node(reader, n)).map(|v| (v.name.clone(), v)).collect()
}

/// The nodes some replicas are bound to that are down, and those that drain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoundNodes {
    /// NotReady or missing.
    pub down: BTreeSet<ObjectName>,
    /// `spec.draining` (whatever their state).
    pub draining: BTreeSet<ObjectName>,
    /// Failed GPUs by node (only nodes that have some).
    pub failed_gpus: BTreeMap<ObjectName, BTreeSet<u32>>,
}

impl BoundNodes {
    /// Whether `r` is bound to a GPU that failed.
    pub fn on_failed_gpu(failed: &BTreeMap<ObjectName, BTreeSet<u32>>, r: &ReplicaView) -> bool {
        r.spec.bindings().into_iter().any(|(n, gpus)| failed.get(n).is_some_and(|f| gpus.iter().any(|g| f.contains(g))))
    }
}

impl BoundNodes {
    /// Looks up each node the `replicas` are bound to once (`lookup`: the stored node).
    pub fn of<'a>(
        replicas: impl IntoIterator<Item = &'a ReplicaView>,
        lookup: impl Fn(&ObjectName) -> Option<NodeView>,
    ) -> BoundNodes {
        // every node each replica binds: a gang's members' too
        let nodes: BTreeSet<&ObjectName> =
            replicas.into_iter().flat_map(|r| r.spec.bindings().into_iter().map(|(n, _)| n)).collect();
        let mut out = BoundNodes::default();
        for n in nodes {
            let node = lookup(n);
            if is_down(node.as_ref()) {
                out.down.insert(n.clone());
            }
            if let Some(v) = &node {
                if v.spec.draining {
                    out.draining.insert(n.clone());
                }
                let failed: BTreeSet<u32> = v.status.failed_gpus().collect();
                if !failed.is_empty() {
                    out.failed_gpus.insert(n.clone(), failed);
                }
            }
        }
        out
    }

    /// [`BoundNodes::of`] over the state machine.
    pub fn read<'a>(reader: &StoreReader, replicas: impl IntoIterator<Item = &'a ReplicaView>) -> BoundNodes {
        BoundNodes::of(replicas, |n| read_node(reader, n))
    }
}

#[cfg(test)]
mod tests {
    use flotilla_api::spec::ReplicaPhase;

    use super::*;
    use crate::testkit::{name, World};

    #[test]
    fn down_is_not_ready_or_missing_and_draining_is_the_spec() {
        // (node state, spec.draining, exists) -> (down, draining)
        let cases = [
            (NodeState::Ready, false, true, false, false),
            (NodeState::Cordoned, false, true, false, false),
            (NodeState::Draining, true, true, false, true),
            (NodeState::Drained, true, true, false, true),
            (NodeState::NotReady, false, true, true, false),
            (NodeState::NotReady, true, true, true, true),
            (NodeState::Ready, false, false, true, false),
        ];
        for (state, draining, exists, want_down, want_draining) in cases {
            let mut w = World::default();
            w.node("a", 2, "A");
            w.set_node("a", |sp, st| {
                sp.draining = draining;
                st.state = state;
            });
            w.replica("m-1", "m", 1, ReplicaPhase::Ready, Some(("a", vec![0])));
            let node = exists.then(|| w.get_node("a"));
            assert_eq!(is_down(node.as_ref()), want_down, "{state:?} draining={draining} exists={exists}");
            let replicas = w.replicas();
            let got = BoundNodes::of(&replicas, |_| node.clone());
            let set = |b: bool| if b { BTreeSet::from([name("a")]) } else { BTreeSet::new() };
            let want = BoundNodes { down: set(want_down), draining: set(want_draining), ..Default::default() };
            assert_eq!(got, want, "{state:?}");
        }
    }

    #[test]
    fn only_the_nodes_replicas_are_bound_to_are_read_once_each() {
        let mut w = World::default();
        for n in ["a", "b", "c"] {
            w.node(n, 4, "A");
        }
        w.set_node("b", |_, st| st.state = NodeState::NotReady);
        w.set_node("c", |_, st| st.state = NodeState::NotReady);
        w.replica("m-1", "m", 1, ReplicaPhase::Ready, Some(("a", vec![0])));
        w.replica("m-2", "m", 1, ReplicaPhase::Ready, Some(("a", vec![1])));
        w.replica("m-3", "m", 1, ReplicaPhase::Starting, Some(("b", vec![0])));
        w.replica("m-4", "m", 1, ReplicaPhase::Pending, None);
        w.replica("m-5", "m", 1, ReplicaPhase::Failed, Some(("gone", vec![0])));
        let replicas = w.replicas();
        let asked = std::cell::RefCell::new(Vec::new());
        let nodes = w.nodes();
        let got = BoundNodes::of(&replicas, |n| {
            asked.borrow_mut().push(n.to_string());
            nodes.iter().find(|v| &v.name == n).cloned()
        });
        assert_eq!(asked.into_inner(), vec!["a", "b", "gone"], "c has no replica; a is read once");
        assert_eq!(got.down, BTreeSet::from([name("b"), name("gone")]));
        assert!(got.draining.is_empty());
    }

    #[test]
    fn failed_gpus_are_listed_per_node_and_match_the_replicas_bound_to_them() {
        use flotilla_api::spec::{GpuHealth, GpuHealthState};
        let mut w = World::default();
        w.node("a", 4, "A");
        w.node("b", 4, "A");
        w.set_node("a", |_, st| {
            st.unhealthy_gpus = vec![1];
            st.gpu_health.insert(2, GpuHealth { state: GpuHealthState::Degraded, ..Default::default() });
        });
        w.set_node("b", |_, st| {
            st.gpu_health.insert(3, GpuHealth { state: GpuHealthState::Failed, ..Default::default() });
        });
        w.replica("m-1", "m", 2, ReplicaPhase::Ready, Some(("a", vec![0, 1])));
        w.replica("m-2", "m", 1, ReplicaPhase::Ready, Some(("a", vec![2])));
        w.replica("m-3", "m", 1, ReplicaPhase::Ready, Some(("b", vec![3])));
        w.replica("m-4", "m", 1, ReplicaPhase::Ready, Some(("b", vec![0])));
        let replicas = w.replicas();
        let nodes = w.nodes();
        let got = BoundNodes::of(&replicas, |n| nodes.iter().find(|v| &v.name == n).cloned());
        let want = BTreeMap::from([(name("a"), BTreeSet::from([1])), (name("b"), BTreeSet::from([3]))]);
        assert_eq!(got.failed_gpus, want, "Degraded is not Failed");
        let on: Vec<String> = replicas
            .iter()
            .filter(|r| BoundNodes::on_failed_gpu(&got.failed_gpus, r))
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(on, vec!["m-1", "m-3"]);
    }
}
