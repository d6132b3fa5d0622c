//! Tests of placement: filters, scoring, reasons, and never over-committing a GPU.
use std::collections::BTreeSet;

use flotilla_api::spec::{NodeState, ReplicaPhase};
use flotilla_storage::{Command, CommandResult};

use super::*;
use crate::testkit::{name, World};

fn run(w: &mut World, strategy: PlacementStrategy) -> Plan {
    let p = plan(&w.nodes(), &w.replicas(), strategy, &BTreeSet::new(), 512);
    w.apply_all(&p.binds);
    if let Some(r) = &p.reasons {
        w.apply_all(std::slice::from_ref(r));
    }
    p
}

fn placed_on(w: &World) -> Vec<(String, String, Vec<u32>)> {
    w.replicas()
        .into_iter()
        .filter_map(|r| r.spec.node.clone().map(|n| (r.name.to_string(), n.to_string(), r.spec.gpus.clone())))
        .collect()
}

#[test]
fn bin_pack_fills_the_fullest_node_first() {
    let mut w = World::default();
    w.node("a", 4, "A100");
    w.node("b", 4, "A100");
    w.replica("m-old", "m", 2, ReplicaPhase::Ready, Some(("b", vec![0, 1])));
    w.replica("m-1", "m", 1, ReplicaPhase::Pending, None);
    w.replica("m-2", "m", 1, ReplicaPhase::Pending, None);
    let p = run(&mut w, PlacementStrategy::BinPack);
    assert_eq!(p.bound, 2);
    assert_eq!(p.binds.len(), 1, "one node touched, one transaction");
    let placed = placed_on(&w);
    assert!(placed.contains(&("m-1".into(), "b".into(), vec![2])), "{placed:?}");
    assert!(placed.contains(&("m-2".into(), "b".into(), vec![3])), "{placed:?}");
    w.assert_consistent();
    let r = w.replicas().into_iter().find(|r| r.name == name("m-1")).unwrap();
    assert_eq!(r.phase(), ReplicaPhase::Scheduled);
}

#[test]
fn spread_prefers_emptier_nodes_and_other_models_nodes() {
    let mut w = World::default();
    for n in ["a", "b", "c"] {
        w.node(n, 4, "A100");
    }
    for i in 0..3 {
        w.replica(&format!("m-{i}"), "m", 1, ReplicaPhase::Pending, None);
    }
    run(&mut w, PlacementStrategy::Spread);
    let nodes: BTreeSet<String> = placed_on(&w).into_iter().map(|(_, n, _)| n).collect();
    assert_eq!(nodes.len(), 3, "one replica per node");
    w.assert_consistent();
}

#[test]
fn filters_state_cordon_drain_type_and_health() {
    let mut w = World::default();
    w.node("notready", 8, "H100-80GB");
    w.set_node("notready", |_, st| st.state = NodeState::NotReady);
    w.node("cordoned", 8, "H100-80GB");
    w.set_node("cordoned", |sp, _| sp.cordoned = true);
    w.node("draining", 8, "H100-80GB");
    w.set_node("draining", |sp, _| sp.draining = true);
    w.node("wrongtype", 8, "A100-80GB");
    w.node("sick", 2, "H100-80GB");
    w.set_node("sick", |_, st| st.unhealthy_gpus = vec![1]);
    w.node("good", 2, "H100-80GB");
    w.replica("m-1", "m", 2, ReplicaPhase::Pending, None);
    w.replica("m-2", "m", 2, ReplicaPhase::Pending, None);
    // Both need H100s.
    let mut reps = w.replicas();
    for r in &mut reps {
        r.spec.gpu_types = vec!["H100-80GB".into()];
    }
    let p = plan(&w.nodes(), &reps, PlacementStrategy::BinPack, &BTreeSet::new(), 512);
    assert_eq!((p.bound, p.unplaceable), (1, 1));
    w.apply_all(&p.binds);
    w.apply_all(&p.reasons.into_iter().collect::<Vec<_>>());
    let placed = placed_on(&w);
    assert_eq!(placed, vec![("m-1".into(), "good".into(), vec![0, 1])]);
    let r2 = w.replicas().into_iter().find(|r| r.name == name("m-2")).unwrap();
    assert_eq!(
        r2.status.reason,
        "no node has 2 free GPUs of type H100-80GB: 2 have at most 1 free, 1 has enough only of another type, \
         1 is not Ready, 1 is cordoned, 1 is draining"
    );
    assert_eq!(p.unplaced, vec![(name("m-2"), UnplaceableCode::GpuType)]);
    assert_eq!(r2.phase(), ReplicaPhase::Pending);
}

#[test]
fn gpus_of_one_replica_share_a_type() {
    let mut w = World::default();
    w.node("mixed", 0, "x");
    w.set_node("mixed", |sp, _| {
        sp.gpus = vec![
            flotilla_api::spec::Gpu { index: 0, gpu_type: "A".into(), memory_mib: 1 },
            flotilla_api::spec::Gpu { index: 1, gpu_type: "B".into(), memory_mib: 1 },
        ];
    });
    w.replica("m-1", "m", 2, ReplicaPhase::Pending, None);
    let p = run(&mut w, PlacementStrategy::BinPack);
    assert_eq!(p.bound, 0);
    assert_eq!(w.replicas()[0].status.reason, "no node has 2 free GPUs: 1 has enough only across GPU types");
}

#[test]
fn unchanged_reasons_are_not_rewritten() {
    let mut w = World::default();
    w.replica("m-1", "m", 1, ReplicaPhase::Pending, None);
    let p = run(&mut w, PlacementStrategy::BinPack);
    assert!(p.reasons.is_some());
    let p = run(&mut w, PlacementStrategy::BinPack);
    let unplaced = vec![(name("m-1"), UnplaceableCode::NoNodes)];
    assert_eq!(p, Plan { unplaceable: 1, unplaced, ..Plan::default() });
    assert_eq!(w.replicas()[0].status.reason, "no node has 1 free GPU: the cluster has no nodes");
}

#[test]
fn reasons_count_the_nodes_by_what_ruled_each_out() {
    let mut w = World::default();
    w.node("down", 4, "A100");
    w.set_node("down", |_, st| st.state = NodeState::NotReady);
    w.node("c1", 4, "A100");
    w.set_node("c1", |sp, _| sp.cordoned = true);
    w.node("c2", 4, "A100");
    w.set_node("c2", |sp, _| sp.cordoned = true);
    w.replica("m-1", "m", 1, ReplicaPhase::Pending, None);
    let p = run(&mut w, PlacementStrategy::BinPack);
    assert_eq!(p.unplaced, vec![(name("m-1"), UnplaceableCode::NoSchedulableNode)]);
    assert_eq!(w.replicas()[0].status.reason, "no node has 1 free GPU: 1 is not Ready, 2 are cordoned");
    // Two schedulable nodes, each short: the most any has free is named.
    w.node("a", 2, "A100");
    w.node("b", 1, "A100");
    w.replica("m-2", "m", 4, ReplicaPhase::Pending, None);
    w.replica("m-3", "m", 3, ReplicaPhase::Pending, None);
    let p = run(&mut w, PlacementStrategy::BinPack);
    assert_eq!(p.bound, 1, "m-1 fits now");
    let reason = |r: &str| w.replicas().into_iter().find(|x| x.name == name(r)).unwrap().status.reason;
    assert_eq!(reason("m-2"), "no node has 4 free GPUs: 2 have at most 2 free, 1 is not Ready, 2 are cordoned");
    assert_eq!(reason("m-3"), "no node has 3 free GPUs: 2 have at most 2 free, 1 is not Ready, 2 are cordoned");
}

#[test]
fn a_stale_plan_conflicts_instead_of_double_binding() {
    let mut w = World::default();
    w.node("a", 1, "A100");
    w.replica("m-1", "m", 1, ReplicaPhase::Pending, None);
    w.replica("n-1", "n", 1, ReplicaPhase::Pending, None);
    let nodes = w.nodes();
    let all = w.replicas();
    let only = |n: &str| all.iter().filter(|r| r.name == name(n)).cloned().collect::<Vec<_>>();
    let p1 = plan(&nodes, &only("m-1"), PlacementStrategy::BinPack, &BTreeSet::new(), 512);
    let p2 = plan(&nodes, &only("n-1"), PlacementStrategy::BinPack, &BTreeSet::new(), 512);
    assert!(matches!(w.apply(&p1.binds[0]), CommandResult::Txn { .. }));
    assert!(matches!(w.apply(&p2.binds[0]), CommandResult::Conflict { .. }));
    w.assert_consistent();
}

#[test]
fn never_over_commits_under_random_load() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..20 {
        let mut w = World::default();
        let nodes = rng.random_range(1..8);
        let mut capacity = 0;
        for i in 0..nodes {
            let g = rng.random_range(0..9);
            capacity += g;
            w.node(&format!("n{i}"), g, if i % 2 == 0 { "A" } else { "B" });
        }
        let mut asked = 0;
        for i in 0..rng.random_range(0..30) {
            let g = rng.random_range(0..4);
            asked += g;
            w.replica(&format!("r{i}"), &format!("m{}", i % 3), g, ReplicaPhase::Pending, None);
        }
        let strategy = if round % 2 == 0 { PlacementStrategy::BinPack } else { PlacementStrategy::Spread };
        // Several rounds, small batches: later rounds see the earlier bindings.
        for _ in 0..3 {
            let p = plan(&w.nodes(), &w.replicas(), strategy, &BTreeSet::new(), 2);
            w.apply_all(&p.binds);
        }
        w.assert_consistent();
        let used: usize = w.nodes().iter().map(|n| n.status.allocations.len()).sum();
        assert!(used <= capacity as usize && used <= asked as usize, "round {round}");
        let binds: Vec<Command> = plan(&w.nodes(), &w.replicas(), strategy, &BTreeSet::new(), 2).binds;
        assert!(binds.is_empty(), "a second plan finds nothing more to place");
    }
}

#[test]
fn a_pd_member_asked_to_colocate_goes_where_the_other_role_runs() {
    use flotilla_api::spec::{EngineRole, KvConnector, KvTransferRole};
    let mut w = World::default();
    for (n, rack) in [("a", "r1"), ("b", "r1"), ("c", "r2"), ("d", "r2")] {
        w.node(n, 4, "A100");
        let mut v = w.get_node(n);
        v.labels.insert("flotilla.io/rack".into(), rack.into());
        w.put(flotilla_api::Kind::Node, n, v.labels, serde_json::json!(v.spec), serde_json::json!(v.status));
    }
    // the decode pool runs in r2; bin-pack alone would pick the fuller node b in r1
    w.replica("chat-decode-1", "chat-decode", 1, ReplicaPhase::Ready, Some(("c", vec![0])));
    w.replica("other-1", "other", 2, ReplicaPhase::Ready, Some(("b", vec![0, 1])));
    let role = |colocate: Option<&str>| {
        Some(KvTransferRole {
            connector: KvConnector::Nixl,
            role: EngineRole::Prefill,
            colocate: colocate.map(str::to_owned),
        })
    };
    for (i, colocate) in [Some("flotilla.io/rack"), None].into_iter().enumerate() {
        let r = format!("chat-prefill-{i}");
        w.replica(&r, "chat-prefill", 1, ReplicaPhase::Pending, None);
        w.replicas_mut(&r, |s, _| s.kv_transfer = role(colocate));
        run(&mut w, PlacementStrategy::BinPack);
        let node = placed_on(&w).into_iter().find(|(n, _, _)| *n == r).map(|(_, node, _)| node);
        match colocate {
            Some(_) => assert_eq!(node.as_deref(), Some("c"), "beside the decode pool (r2), the fuller node there"),
            None => assert_eq!(node.as_deref(), Some("b"), "no colocation: plain bin-pack"),
        }
    }
    // a domain without room is no constraint: the replica goes elsewhere
    w.replica("other-2", "other", 1, ReplicaPhase::Ready, Some(("d", vec![0])));
    w.replica("big", "chat-prefill", 4, ReplicaPhase::Pending, None);
    w.replicas_mut("big", |s, _| s.kv_transfer = role(Some("flotilla.io/rack")));
    run(&mut w, PlacementStrategy::BinPack);
    let big = placed_on(&w).into_iter().find(|(n, _, _)| n == "big").map(|(_, node, _)| node);
    assert_eq!(big.as_deref(), Some("a"), "r2 has no node with 4 free GPUs");
    w.assert_consistent();
}
