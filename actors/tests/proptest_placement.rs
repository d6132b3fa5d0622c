//! Property tests of placement (`flotilla_actors::placement`): for arbitrary node and GPU
//! inventories (states, cordons, drains, unhealthy and already bound GPUs, mixed types) and
//! arbitrary pending replicas, a plan applied to a real `flotilla_storage::Store` never
//! conflicts, never binds a GPU twice, never uses more than a node's free healthy GPUs,
//! honours `gpu_types`, leaves unplaced only replicas that no node can still take, and is
//! the same for the same input (in any order of the replicas).
//!
//! ```text
//!  strategies ──> Store (nodes, replicas) ──views──> plan() ──binds──> Store ──> invariants
//!                                                      └─ plan() again / shuffled ──> equal
//! ```
use std::collections::{BTreeMap, BTreeSet};

use flotilla_actors::objects::{key, NodeView, ReplicaView, MODEL_LABEL};
use flotilla_actors::placement::{plan, schedulable, unplaceable_reason, Placer};
use flotilla_actors::PlacementStrategy;
use flotilla_api::spec::{EngineKind, Gpu, NodeSpec, NodeState, NodeStatus, ReplicaPhase, ReplicaSpec, ReplicaStatus};
use flotilla_api::{Kind, LabelSelector, ObjectName};
use flotilla_storage::{Command, CommandResult, Store, TxnOp};
use proptest::prelude::*;
use serde_json::json;

const TYPES: [&str; 3] = ["A100", "H100", "L4"];

fn name(s: &str) -> ObjectName {
    s.parse().expect("valid name")
}

/// One node as generated: its GPUs (unique indices), which are unhealthy, which are bound
/// to a replica that already runs there, and its schedulability.
#[derive(Debug, Clone)]
struct NodeGen {
    gpus: Vec<(u32, &'static str)>,
    unhealthy: BTreeSet<u32>,
    bound: BTreeSet<u32>,
    state: NodeState,
    cordoned: bool,
    draining: bool,
}

#[derive(Debug, Clone)]
struct ReplicaGen {
    model: u8,
    gpus_needed: u32,
    gpu_types: Vec<&'static str>,
    /// A reason left by an earlier round (sometimes the one this round would write).
    old_reason: Option<bool>,
}

fn node_gen() -> impl Strategy<Value = NodeGen> {
    (
        prop::collection::btree_set(0u32..12, 0..8),
        prop::collection::vec(prop::sample::select(TYPES.to_vec()), 8),
        prop::collection::btree_set(0u32..14, 0..3),
        prop::collection::btree_set(0u32..12, 0..4),
        prop_oneof![
            6 => Just(NodeState::Ready),
            1 => Just(NodeState::NotReady),
            1 => Just(NodeState::Cordoned),
            1 => Just(NodeState::Draining),
            1 => Just(NodeState::Drained),
        ],
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(indices, types, unhealthy, bound, state, cordoned, draining)| {
            // Unique indices (the agent service refuses duplicates), mixed types.
            let gpus: Vec<(u32, &'static str)> = indices.iter().zip(types).map(|(i, t)| (*i, t)).collect();
            let bound = bound.intersection(&indices).copied().collect();
            NodeGen { gpus, unhealthy, bound, state, cordoned, draining }
        })
}

fn replica_gen() -> impl Strategy<Value = ReplicaGen> {
    (
        0u8..4,
        prop_oneof![1 => Just(0u32), 6 => 1u32..4, 1 => 4u32..9],
        prop::collection::vec(prop::sample::select(TYPES.to_vec()), 0..3),
        prop::option::of(prop::bool::ANY),
    )
        .prop_map(|(model, gpus_needed, gpu_types, old_reason)| ReplicaGen {
            model,
            gpus_needed,
            gpu_types,
            old_reason,
        })
}

fn strategy() -> impl Strategy<Value = PlacementStrategy> {
    prop::sample::select(vec![PlacementStrategy::BinPack, PlacementStrategy::Spread])
}

/// A store holding the generated nodes, the replicas already bound on them, and the pending
/// replicas, in that order (so create revisions follow the pending list).
fn world(nodes: &[NodeGen], pending: &[ReplicaGen]) -> Store {
    let mut store = Store::new(100_000);
    let put = |store: &mut Store, op: TxnOp| {
        let r = store.apply(&Command::Txn { compares: vec![], ops: vec![op] });
        assert!(matches!(r, CommandResult::Txn { .. }), "{r:?}");
    };
    for (ni, n) in nodes.iter().enumerate() {
        let node = name(&format!("n{ni}"));
        let spec = NodeSpec {
            address: "127.0.0.1".into(),
            gpus: n.gpus.iter().map(|(index, t)| Gpu { index: *index, gpu_type: (*t).into(), memory_mib: 1 }).collect(),
            agent_id: format!("agent-{ni}"),
            cordoned: n.cordoned,
            draining: n.draining,
        };
        let allocations: BTreeMap<u32, ObjectName> =
            n.bound.iter().map(|g| (*g, name(&format!("old-{ni}-{g}")))).collect();
        let status = NodeStatus {
            state: n.state,
            allocations: allocations.clone(),
            unhealthy_gpus: n.unhealthy.iter().copied().collect(),
            ..NodeStatus::default()
        };
        put(
            &mut store,
            TxnOp::Put {
                key: key(Kind::Node, &node),
                uid: format!("uid-n{ni}"),
                labels: BTreeMap::new(),
                spec: json!(spec),
                status: Some(json!(status)),
            },
        );
        for (g, r) in allocations {
            let spec = replica_spec(&format!("m{}", g % 4), 1, vec![], Some(node.clone()), vec![g]);
            let status = ReplicaStatus { phase: ReplicaPhase::Ready, ..ReplicaStatus::default() };
            put(&mut store, replica_op(&r, &spec, &status));
        }
    }
    for (i, r) in pending.iter().enumerate() {
        let spec = replica_spec(
            &format!("m{}", r.model),
            r.gpus_needed,
            r.gpu_types.iter().map(|t| (*t).to_owned()).collect(),
            None,
            vec![],
        );
        let reason = match r.old_reason {
            None => String::new(),
            Some(true) => unplaceable_reason(&spec),
            Some(false) => "no node is Ready and schedulable".into(),
        };
        let status = ReplicaStatus { phase: ReplicaPhase::Pending, reason, ..ReplicaStatus::default() };
        put(&mut store, replica_op(&name(&format!("r{i}")), &spec, &status));
    }
    store
}

fn replica_spec(
    model: &str,
    gpus_needed: u32,
    gpu_types: Vec<String>,
    node: Option<ObjectName>,
    gpus: Vec<u32>,
) -> ReplicaSpec {
    ReplicaSpec {
        kv_transfer: None,
        engine_image: Default::default(),
        topology: None,
        members: Vec::new(),
        model: name(model),
        engine: EngineKind::Sim,
        source: "file:///m".into(),
        engine_args: vec![],
        gpus_needed,
        gpu_types,
        node,
        gpus,
        adapters: vec![],
        template_hash: String::new(),
    }
}

fn replica_op(r: &ObjectName, spec: &ReplicaSpec, status: &ReplicaStatus) -> TxnOp {
    TxnOp::Put {
        key: key(Kind::Replica, r),
        uid: format!("uid-{r}"),
        labels: BTreeMap::from([(MODEL_LABEL.to_owned(), spec.model.to_string())]),
        spec: json!(spec),
        status: Some(json!(status)),
    }
}

fn nodes_of(store: &Store) -> Vec<NodeView> {
    store.list(Kind::Node, &LabelSelector::default()).iter().map(|o| NodeView::from_stored(o).expect("node")).collect()
}

fn replicas_of(store: &Store) -> Vec<ReplicaView> {
    store
        .list(Kind::Replica, &LabelSelector::default())
        .iter()
        .map(|o| ReplicaView::from_stored(o).expect("replica"))
        .collect()
}

/// Whether some node of `nodes` could still take `r`: schedulable, with `gpus_needed` free
/// healthy GPUs of one allowed type.
fn fits_somewhere(nodes: &[NodeView], r: &ReplicaSpec) -> bool {
    nodes.iter().filter(|n| schedulable(n)).any(|n| {
        let mut by_type: BTreeMap<&str, u32> = BTreeMap::new();
        for g in n.status.free_gpus(&n.spec) {
            *by_type.entry(g.gpu_type.as_str()).or_default() += 1;
        }
        r.gpus_needed == 0
            || by_type.iter().any(|(t, free)| {
                *free >= r.gpus_needed && (r.gpu_types.is_empty() || r.gpu_types.iter().any(|a| a == t))
            })
    })
}

fn spread_set(models: &BTreeSet<u8>) -> BTreeSet<ObjectName> {
    models.iter().map(|m| name(&format!("m{m}"))).collect()
}

proptest! {
    // 256 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn plans_apply_cleanly_and_never_over_commit(
        nodes in prop::collection::vec(node_gen(), 0..6),
        pending in prop::collection::vec(replica_gen(), 0..16),
        default in strategy(),
        spread in prop::collection::btree_set(0u8..4, 0..3),
        batch in 1usize..6,
    ) {
        let mut store = world(&nodes, &pending);
        let (before_nodes, before_replicas) = (nodes_of(&store), replicas_of(&store));
        let p = plan(&before_nodes, &before_replicas, default, &spread_set(&spread), batch);
        prop_assert_eq!(p.bound + p.unplaceable, pending.len());

        // Each node is written by at most one transaction, and every transaction applies.
        let mut touched = BTreeSet::new();
        for cmd in &p.binds {
            let Command::Txn { ops, .. } = cmd else { panic!("binds are transactions: {cmd:?}") };
            for op in ops {
                if let TxnOp::PutStatus { key, .. } = op {
                    prop_assert!(touched.insert(key.clone()), "{} written by two transactions", key);
                }
            }
            let r = store.apply(cmd);
            prop_assert!(matches!(r, CommandResult::Txn { .. }), "{:?} for {:?}", r, cmd);
        }
        if let Some(reasons) = &p.reasons {
            let r = store.apply(reasons);
            prop_assert!(matches!(r, CommandResult::Txn { .. }), "{:?}", r);
        }

        let after_nodes = nodes_of(&store);
        let after_replicas = replicas_of(&store);
        let before: BTreeMap<&ObjectName, &NodeView> = before_nodes.iter().map(|n| (&n.name, n)).collect();
        let mut newly_bound = 0;
        let mut claimed: BTreeMap<(ObjectName, u32), ObjectName> = BTreeMap::new();
        for r in &after_replicas {
            let Some(node) = &r.spec.node else {
                // Unplaced: still Pending, because no node can take it even now.
                prop_assert_eq!(r.phase(), ReplicaPhase::Pending);
                prop_assert!(!fits_somewhere(&after_nodes, &r.spec), "{} left pending but fits", r.name);
                let headline = format!("{}: ", unplaceable_reason(&r.spec));
                prop_assert!(r.status.reason.starts_with(&headline), "reason {:?}", r.status.reason);
                continue;
            };
            for g in &r.spec.gpus {
                let prev = claimed.insert((node.clone(), *g), r.name.clone());
                prop_assert!(prev.is_none(), "gpu {} of {} bound to {:?} and {}", g, node, prev, r.name);
            }
            if r.name.as_str().starts_with("old-") {
                continue;
            }
            newly_bound += 1;
            prop_assert_eq!(r.phase(), ReplicaPhase::Scheduled);
            prop_assert!(r.status.reason.is_empty());
            let n = before[node];
            prop_assert!(schedulable(n), "{} bound to unschedulable {}", r.name, node);
            prop_assert_eq!(r.spec.gpus.len(), r.spec.gpus_needed as usize, "{}", r.name);
            let free: BTreeMap<u32, &Gpu> = n.status.free_gpus(&n.spec).map(|g| (g.index, g)).collect();
            let types: BTreeSet<&str> = r
                .spec
                .gpus
                .iter()
                .map(|g| {
                    let t = free.get(g).map(|x| x.gpu_type.as_str());
                    t.ok_or_else(|| format!("gpu {g} of {node} was not free"))
                })
                .collect::<Result<_, _>>()
                .map_err(TestCaseError::fail)?;
            prop_assert!(types.len() <= 1, "{} spans GPU types {:?}", r.name, types);
            if let Some(t) = types.first() {
                prop_assert!(r.spec.gpu_types.is_empty() || r.spec.gpu_types.iter().any(|a| a == t));
            }
        }
        prop_assert_eq!(newly_bound, p.bound);

        // Node allocations agree with the bindings, and never exceed the free GPUs.
        for n in &after_nodes {
            let b = before[&n.name];
            let fresh: Vec<_> = n.status.allocations.keys().filter(|g| !b.status.allocations.contains_key(g)).collect();
            let free = b.free_gpus();
            prop_assert!(fresh.len() <= free, "{}: {} new allocations, {} free", n.name, fresh.len(), free);
            for (g, r) in &n.status.allocations {
                prop_assert_eq!(claimed.get(&(n.name.clone(), *g)), Some(r), "allocation {} of {}", g, n.name);
            }
        }
        prop_assert_eq!(claimed.len(), after_nodes.iter().map(|n| n.status.allocations.len()).sum::<usize>());

        // A second round finds nothing more to bind and no reason to rewrite.
        let again = plan(&after_nodes, &after_replicas, default, &spread_set(&spread), batch);
        prop_assert!(again.binds.is_empty() && again.reasons.is_none(), "{:?}", again);
    }

    #[test]
    fn plans_are_deterministic(
        nodes in prop::collection::vec(node_gen(), 0..6),
        pending in prop::collection::vec(replica_gen(), 0..16),
        default in strategy(),
        spread in prop::collection::btree_set(0u8..4, 0..3),
        shuffle in any::<u64>(),
    ) {
        let store = world(&nodes, &pending);
        let (ns, rs) = (nodes_of(&store), replicas_of(&store));
        let spread = spread_set(&spread);
        let p1 = plan(&ns, &rs, default, &spread, 4);
        prop_assert_eq!(&p1, &plan(&ns, &rs, default, &spread, 4));
        // The order replicas are listed in does not matter (create revisions do).
        let mut shuffled = rs.clone();
        let mut s = shuffle;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        prop_assert_eq!(&p1, &plan(&ns, &shuffled, default, &spread, 4));
    }

    #[test]
    fn placer_never_hands_out_a_gpu_twice(
        nodes in prop::collection::vec(node_gen(), 1..5),
        asks in prop::collection::vec((replica_gen(), strategy()), 0..24),
    ) {
        let store = world(&nodes, &[]);
        let (ns, rs) = (nodes_of(&store), replicas_of(&store));
        let mut placer = Placer::new(&ns, &rs);
        let mut taken: BTreeSet<(usize, u32)> = BTreeSet::new();
        for (r, s) in &asks {
            let spec = replica_spec(
                &format!("m{}", r.model),
                r.gpus_needed,
                r.gpu_types.iter().map(|t| (*t).to_owned()).collect(),
                None,
                vec![],
            );
            match placer.place(&spec, *s) {
                Ok((i, gpus)) => {
                    prop_assert!(schedulable(&ns[i]));
                    prop_assert_eq!(gpus.len(), r.gpus_needed as usize);
                    for g in gpus {
                        prop_assert!(ns[i].status.free_gpus(&ns[i].spec).any(|x| x.index == g), "gpu {} not free", g);
                        prop_assert!(taken.insert((i, g)), "gpu {} of node {} handed out twice", g, i);
                    }
                }
                Err(why) => prop_assert!(
                    why.message.starts_with(&format!("{}: ", unplaceable_reason(&spec))),
                    "{} does not start with the headline",
                    why.message
                ),
            }
        }
    }

    #[test]
    fn scoring_picks_the_fullest_or_emptiest_feasible_node(
        nodes in prop::collection::vec(node_gen(), 1..6),
        r in replica_gen(),
        s in strategy(),
    ) {
        let store = world(&nodes, &[]);
        let (ns, rs) = (nodes_of(&store), replicas_of(&store));
        let gpu_types = r.gpu_types.iter().map(|t| (*t).to_owned()).collect();
        let spec = replica_spec(&format!("m{}", r.model), r.gpus_needed, gpu_types, None, vec![]);
        let same = |n: &NodeView| {
            rs.iter().filter(|x| x.spec.node.as_ref() == Some(&n.name) && x.spec.model == spec.model).count()
        };
        let feasible: Vec<&NodeView> = ns.iter().filter(|n| fits_somewhere(std::slice::from_ref(*n), &spec)).collect();
        match Placer::new(&ns, &rs).place(&spec, s) {
            Err(_) => prop_assert!(feasible.is_empty()),
            Ok((i, _)) => {
                // BinPack: fewest GPUs left free after, then fewest replicas of the model;
                // Spread: fewest replicas of the model, then most GPUs left free.
                let key = |n: &NodeView| {
                    let after = (n.free_gpus() - r.gpus_needed as usize) as i64;
                    match s {
                        PlacementStrategy::BinPack => (after, same(n) as i64),
                        PlacementStrategy::Spread => (same(n) as i64, -after),
                    }
                };
                let best = feasible.iter().map(|n| key(n)).min().expect("a node was chosen");
                let names: Vec<_> = feasible.iter().map(|n| &n.name).collect();
                prop_assert_eq!(key(&ns[i]), best, "chose {} of {:?}", ns[i].name, names);
            }
        }
    }
}
