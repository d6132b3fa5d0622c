//! Tests of gang placement: all members or none, one GPU type, the four placements over
//! domains, reasons word for word, and the one transaction that binds a gang.
use std::collections::{BTreeMap, BTreeSet};

use flotilla_api::spec::{GangPlacement, ReplicaPhase, Topology};

use crate::config::PlacementStrategy;
use crate::placement::{plan, UnplaceableCode};
use crate::testkit::{name, World};

fn rack(w: &mut World, n: &str, gpus: u32, ty: &str, rack: Option<&str>) {
    w.node(n, gpus, ty);
    if let Some(r) = rack {
        let mut v = w.get_node(n);
        v.labels.insert("flotilla.io/rack".into(), r.into());
        w.put(flotilla_api::Kind::Node, n, v.labels, serde_json::json!(v.spec), serde_json::json!(v.status));
    }
}

fn gang(w: &mut World, n: &str, nodes: u32, per: u32, placement: GangPlacement) {
    w.replica(n, "big", per, ReplicaPhase::Pending, None);
    let t = Topology {
        nodes,
        gpus_per_node: per,
        layout: Default::default(),
        placement,
        domain_label: flotilla_api::spec::DEFAULT_DOMAIN_LABEL.into(),
    };
    w.replicas_mut(n, |s, _| s.topology = Some(t));
}

fn run(w: &mut World) -> crate::placement::Plan {
    let p = plan(&w.nodes(), &w.replicas(), PlacementStrategy::BinPack, &BTreeSet::new(), 512);
    assert!(w.apply_all_ok(&p.binds), "binds apply");
    w.apply_all(&p.reasons.clone().into_iter().collect::<Vec<_>>());
    w.assert_consistent();
    p
}

fn members(w: &World, r: &str) -> Vec<(String, Vec<u32>)> {
    let r = w.replicas().into_iter().find(|x| x.name == name(r)).unwrap();
    r.spec.members.iter().map(|m| (m.node.to_string(), m.gpus.clone())).collect()
}

fn reason(w: &World, r: &str) -> String {
    w.replicas().into_iter().find(|x| x.name == name(r)).unwrap().status.reason
}

#[test]
fn a_gang_is_bound_whole_in_one_transaction_with_the_head_first() {
    let mut w = World::default();
    rack(&mut w, "a", 10, "H100", Some("r1"));
    rack(&mut w, "b", 10, "H100", Some("r1"));
    rack(&mut w, "c", 4, "H100", Some("r1"));
    gang(&mut w, "g", 2, 8, GangPlacement::Pack);
    w.replica("small", "m", 2, ReplicaPhase::Pending, None);
    let p = run(&mut w);
    assert_eq!(p.binds.len(), 1, "the one-node replica bound on a gang's node joins the gang's transaction");
    assert_eq!(members(&w, "g"), vec![("a".into(), (0..8).collect()), ("b".into(), (0..8).collect())]);
    let g = w.replicas().into_iter().find(|x| x.name == name("g")).unwrap();
    assert_eq!((g.spec.node.as_ref().map(|n| n.as_str()), g.phase()), (Some("a"), ReplicaPhase::Scheduled));
    assert_eq!(g.spec.gpus, (0..8).collect::<Vec<u32>>(), "node and gpus are the head's");
    let small = w.replicas().into_iter().find(|x| x.name == name("small")).unwrap();
    assert_eq!(small.spec.node.as_ref().map(|n| n.as_str()), Some("a"));
    // A stale plan (a member's node changed since) applies nothing at all.
    let mut w2 = World::default();
    rack(&mut w2, "a", 8, "H100", None);
    rack(&mut w2, "b", 8, "H100", None);
    gang(&mut w2, "g", 2, 8, GangPlacement::Pack);
    let p = plan(&w2.nodes(), &w2.replicas(), PlacementStrategy::BinPack, &BTreeSet::new(), 512);
    w2.set_node("b", |s, _| s.cordoned = true);
    assert!(!w2.apply_all_ok(&p.binds), "refused by the compare on b");
    assert!(w2.nodes().iter().all(|n| n.status.allocations.is_empty()), "a holds nothing either");
}

#[test]
fn nothing_is_bound_when_one_member_does_not_fit() {
    let mut w = World::default();
    rack(&mut w, "a", 8, "H100", None);
    rack(&mut w, "b", 4, "H100", None);
    rack(&mut w, "c", 8, "A100", None);
    gang(&mut w, "g", 2, 8, GangPlacement::Pack);
    let p = run(&mut w);
    assert_eq!((p.bound, p.unplaced.clone()), (0, vec![(name("g"), UnplaceableCode::GangInsufficientNodes)]));
    assert!(w.nodes().iter().all(|n| n.status.allocations.is_empty()), "no member holds anything");
    // H100 on a, A100 on c: 8 free each, but members share one type
    assert_eq!(reason(&w, "g"), "no 2 nodes have 8 free GPUs of one type: 1 does");
}

#[test]
fn the_cluster_too_small_and_cordoned_nodes_are_named() {
    let mut w = World::default();
    rack(&mut w, "a", 8, "H100", None);
    gang(&mut w, "g", 2, 8, GangPlacement::Pack);
    let p = run(&mut w);
    assert_eq!(p.unplaced, vec![(name("g"), UnplaceableCode::GangTooLarge)]);
    assert_eq!(reason(&w, "g"), "a replica of 2 nodes cannot be placed: the cluster has 1 node");
    rack(&mut w, "b", 8, "H100", None);
    w.set_node("b", |s, _| s.cordoned = true);
    run(&mut w);
    assert_eq!(reason(&w, "g"), "no 2 nodes have 8 free GPUs of one type: 1 does, 1 is cordoned");
    w.set_node("b", |s, _| s.cordoned = false);
    assert_eq!(run(&mut w).bound, 1, "placed once the cordon is lifted");
}

#[test]
fn strict_pack_keeps_a_gang_in_one_domain_or_pending() {
    let mut w = World::default();
    rack(&mut w, "a1", 8, "H100", Some("ra"));
    rack(&mut w, "a2", 8, "H100", Some("ra"));
    rack(&mut w, "b1", 8, "H100", Some("rb"));
    rack(&mut w, "b2", 8, "H100", Some("rb"));
    rack(&mut w, "b3", 8, "H100", Some("rb"));
    gang(&mut w, "g", 2, 8, GangPlacement::StrictPack);
    run(&mut w);
    // the tightest domain that holds the gang: ra (2 nodes), not rb (3)
    assert_eq!(members(&w, "g").iter().map(|m| m.0.as_str()).collect::<Vec<_>>(), ["a1", "a2"]);
    rack(&mut w, "c1", 8, "H100", Some("rc"));
    gang(&mut w, "h", 4, 8, GangPlacement::StrictPack);
    let p = run(&mut w);
    assert_eq!(p.unplaced, vec![(name("h"), UnplaceableCode::GangDomains)]);
    assert_eq!(
        reason(&w, "h"),
        "strict-pack needs 4 nodes with 8 free GPUs of one type in one flotilla.io/rack domain: the most in one is 3"
    );
    // pack spans domains when none is big enough: the largest first
    w.replicas_mut("h", |s, _| s.topology.as_mut().unwrap().placement = GangPlacement::Pack);
    run(&mut w);
    assert_eq!(members(&w, "h").iter().map(|m| m.0.as_str()).collect::<Vec<_>>(), ["b1", "b2", "b3", "c1"]);
}

#[test]
fn spread_and_strict_spread_use_distinct_domains() {
    let mut w = World::default();
    for (n, r) in [("a1", "ra"), ("a2", "ra"), ("b1", "rb"), ("c1", "rc")] {
        rack(&mut w, n, 8, "H100", Some(r));
    }
    gang(&mut w, "s", 3, 4, GangPlacement::StrictSpread);
    run(&mut w);
    let racks = |w: &World, g: &str| -> BTreeSet<String> {
        let labels: BTreeMap<String, String> =
            w.nodes().into_iter().map(|n| (n.name.to_string(), n.labels["flotilla.io/rack"].clone())).collect();
        members(w, g).into_iter().map(|(n, _)| labels[&n].clone()).collect()
    };
    assert_eq!(racks(&w, "s").len(), 3);
    gang(&mut w, "t", 4, 4, GangPlacement::StrictSpread);
    let p = run(&mut w);
    assert_eq!(p.unplaced, vec![(name("t"), UnplaceableCode::GangDomains)]);
    assert_eq!(
        reason(&w, "t"),
        "strict-spread needs 4 nodes with 4 free GPUs of one type in 4 different flotilla.io/rack domains: they are in 3"
    );
    // spread shares a domain when short
    gang(&mut w, "u", 4, 2, GangPlacement::Spread);
    run(&mut w);
    assert_eq!(members(&w, "u").len(), 4);
    assert_eq!(racks(&w, "u").len(), 3);
}
