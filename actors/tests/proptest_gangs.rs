//! Property tests of multi-node placement (`spec.topology`): for arbitrary nodes (GPU counts
//! and types, racks, cordons, readiness) and arbitrary pending gangs and one-node replicas,
//! a plan applied to a real `flotilla_storage::Store` — fresh, or stale because a node
//! changed between planning and applying — never leaves a partial gang, never binds a GPU
//! twice, keeps each gang on one GPU type with one member per node, honours strict-pack and
//! strict-spread, and keeps every node's allocations equal to the replicas' bindings.
use std::collections::{BTreeMap, BTreeSet};

use flotilla_actors::objects::{key, NodeView, ReplicaView};
use flotilla_actors::placement::plan;
use flotilla_actors::PlacementStrategy;
use flotilla_api::spec::{
    EngineKind, GangPlacement, Gpu, NodeSpec, NodeState, NodeStatus, ReplicaPhase, ReplicaSpec, ReplicaStatus,
    Topology, DEFAULT_DOMAIN_LABEL,
};
use flotilla_api::{Kind, LabelSelector, ObjectName};
use flotilla_storage::{Command, CommandResult, Store, TxnOp};
use proptest::prelude::*;
use serde_json::json;

fn name(s: &str) -> ObjectName {
    s.parse().expect("valid name")
}

#[derive(Debug, Clone)]
struct NodeGen {
    gpus: u32,
    gpu_type: &'static str,
    rack: Option<u8>,
    ready: bool,
    cordoned: bool,
}

#[derive(Debug, Clone)]
struct AskGen {
    /// None: a one-node replica of `per` GPUs.
    nodes: Option<u32>,
    per: u32,
    placement: GangPlacement,
    gpu_type: Option<&'static str>,
}

fn node_gen() -> impl Strategy<Value = NodeGen> {
    (
        0u32..9,
        prop::sample::select(vec!["A100", "H100"]),
        prop::option::of(0u8..3),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(gpus, gpu_type, rack, ready, cordoned)| NodeGen { gpus, gpu_type, rack, ready, cordoned })
}

fn ask_gen() -> impl Strategy<Value = AskGen> {
    (
        prop_oneof![1 => Just(None), 2 => (2u32..5).prop_map(Some)],
        1u32..9,
        prop::sample::select(vec![
            GangPlacement::Pack,
            GangPlacement::Spread,
            GangPlacement::StrictPack,
            GangPlacement::StrictSpread,
        ]),
        prop::option::of(prop::sample::select(vec!["A100", "H100"])),
    )
        .prop_map(|(nodes, per, placement, gpu_type)| AskGen { nodes, per, placement, gpu_type })
}

fn put(store: &mut Store, op: TxnOp) {
    let r = store.apply(&Command::Txn { compares: vec![], ops: vec![op] });
    assert!(matches!(r, CommandResult::Txn { .. }), "{r:?}");
}

fn world(nodes: &[NodeGen], asks: &[AskGen]) -> Store {
    let mut store = Store::new(100_000);
    for (i, n) in nodes.iter().enumerate() {
        let spec = NodeSpec {
            address: "127.0.0.1".into(),
            gpus: (0..n.gpus).map(|index| Gpu { index, gpu_type: n.gpu_type.into(), memory_mib: 1 }).collect(),
            agent_id: format!("agent-{i}"),
            cordoned: n.cordoned,
            draining: false,
        };
        let state = if n.ready { NodeState::Ready } else { NodeState::NotReady };
        let labels: BTreeMap<String, String> =
            n.rack.iter().map(|r| (DEFAULT_DOMAIN_LABEL.to_owned(), format!("rack-{r}"))).collect();
        let status = NodeStatus { state, ..NodeStatus::default() };
        let op = TxnOp::Put {
            key: key(Kind::Node, &name(&format!("n{i}"))),
            uid: format!("uid-n{i}"),
            labels,
            spec: json!(spec),
            status: Some(json!(status)),
        };
        put(&mut store, op);
    }
    for (i, a) in asks.iter().enumerate() {
        let topology = a.nodes.map(|nodes| Topology {
            nodes,
            gpus_per_node: a.per,
            layout: Default::default(),
            placement: a.placement,
            domain_label: DEFAULT_DOMAIN_LABEL.into(),
        });
        let spec = ReplicaSpec {
            kv_transfer: None,
            model: name("m"),
            engine: EngineKind::Sim,
            source: "file:///m".into(),
            engine_args: vec![],
            gpus_needed: a.per,
            gpu_types: a.gpu_type.iter().map(|t| (*t).to_owned()).collect(),
            node: None,
            gpus: vec![],
            adapters: vec![],
            template_hash: String::new(),
            engine_image: None,
            topology,
            members: vec![],
        };
        let op = TxnOp::Put {
            key: key(Kind::Replica, &name(&format!("r{i}"))),
            uid: format!("uid-r{i}"),
            labels: BTreeMap::new(),
            spec: json!(spec),
            status: Some(json!(ReplicaStatus::default())),
        };
        put(&mut store, op);
    }
    store
}

fn views(store: &Store) -> (Vec<NodeView>, Vec<ReplicaView>) {
    let all = LabelSelector::default();
    let nodes = store.list(Kind::Node, &all).iter().map(|o| NodeView::from_stored(o).unwrap()).collect();
    let replicas = store.list(Kind::Replica, &all).iter().map(|o| ReplicaView::from_stored(o).unwrap()).collect();
    (nodes, replicas)
}

/// Every invariant of the stored state.
fn check(store: &Store) -> Result<(), TestCaseError> {
    let (nodes, replicas) = views(store);
    let by_name: BTreeMap<&ObjectName, &NodeView> = nodes.iter().map(|n| (&n.name, n)).collect();
    let mut held: BTreeMap<(ObjectName, u32), ObjectName> = BTreeMap::new();
    for r in &replicas {
        let bindings = r.spec.bindings();
        if let Some(t) = &r.spec.topology {
            if r.spec.members.is_empty() {
                prop_assert_eq!(r.phase(), ReplicaPhase::Pending);
                prop_assert!(r.spec.node.is_none(), "{} has a node but no members", r.name);
            } else {
                prop_assert_eq!(r.spec.members.len(), t.nodes as usize, "{} is a partial gang", r.name);
                let distinct: BTreeSet<_> = r.spec.members.iter().map(|m| &m.node).collect();
                prop_assert_eq!(distinct.len(), r.spec.members.len(), "two members of {} share a node", r.name);
                prop_assert_eq!(r.spec.node.as_ref(), Some(&r.spec.members[0].node), "node is the head's");
                let mut types = BTreeSet::new();
                let mut racks = Vec::new();
                for m in &r.spec.members {
                    prop_assert_eq!(m.gpus.len(), t.gpus_per_node as usize);
                    let n = by_name[&m.node];
                    for g in &m.gpus {
                        types.insert(n.spec.gpus.iter().find(|x| x.index == *g).unwrap().gpu_type.clone());
                    }
                    racks
                        .push(n.labels.get(DEFAULT_DOMAIN_LABEL).cloned().unwrap_or_else(|| format!("own-{}", n.name)));
                }
                prop_assert_eq!(types.len(), 1, "{} spans GPU types {:?}", r.name, types);
                if let Some(t0) = r.spec.gpu_types.first() {
                    prop_assert!(types.contains(t0));
                }
                let distinct_racks: BTreeSet<_> = racks.iter().collect();
                match t.placement {
                    GangPlacement::StrictPack => prop_assert_eq!(distinct_racks.len(), 1, "{:?}", racks),
                    GangPlacement::StrictSpread => prop_assert_eq!(distinct_racks.len(), racks.len(), "{:?}", racks),
                    _ => {}
                }
            }
        }
        for (node, gpus) in bindings {
            for g in gpus {
                let prev = held.insert((node.clone(), *g), r.name.clone());
                prop_assert!(prev.is_none(), "gpu {} of {} bound to {:?} and {}", g, node, prev, r.name);
            }
        }
    }
    let allocated: BTreeMap<(ObjectName, u32), ObjectName> = nodes
        .iter()
        .flat_map(|n| n.status.allocations.iter().map(|(g, r)| ((n.name.clone(), *g), r.clone())))
        .collect();
    prop_assert_eq!(allocated, held, "node allocations differ from the replicas' bindings");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn gangs_are_bound_whole_or_not_at_all(
        nodes in prop::collection::vec(node_gen(), 0..8),
        asks in prop::collection::vec(ask_gen(), 1..6),
        stale in prop::option::of(0usize..8),
    ) {
        let mut store = world(&nodes, &asks);
        let (ns, rs) = views(&store);
        let p = plan(&ns, &rs, PlacementStrategy::BinPack, &BTreeSet::new(), 512);
        // A node changes between planning and applying: every transaction comparing it fails.
        if let Some(i) = stale.filter(|i| *i < ns.len()) {
            let n = &ns[i];
            let status = NodeStatus { reason: "changed".into(), ..n.status.clone() };
            put(&mut store, TxnOp::PutStatus { key: n.key(), status: json!(status) });
        }
        for cmd in p.binds.iter().chain(&p.reasons) {
            let _ = store.apply(cmd);
        }
        check(&store)?;
        // Another round on the applied state never breaks them either.
        let (ns, rs) = views(&store);
        let again = plan(&ns, &rs, PlacementStrategy::Spread, &BTreeSet::new(), 2);
        for cmd in again.binds.iter().chain(&again.reasons) {
            prop_assert!(matches!(store.apply(cmd), CommandResult::Txn { .. }), "a fresh plan applies");
        }
        check(&store)?;
        // And once a fresh round's bindings and reasons are in, the next finds nothing to
        // bind and no reason to rewrite (the words count the capacity left after a round).
        if stale.is_none() {
            let (ns, rs) = views(&store);
            let third = plan(&ns, &rs, PlacementStrategy::Spread, &BTreeSet::new(), 2);
            prop_assert!(third.binds.is_empty() && third.reasons.is_none(), "{:?}", third);
        }
    }
}
