//! Tests of the node decision: TTL, grace, release of GPUs, cordon and drain states.
use std::time::Duration;

use flotilla_api::spec::NodeState;

use super::*;
use crate::testkit::{name, World};

/// The wall clock the tests pass in (Unix ms).
const WALL_MS: u64 = 1_700_000_000_000;

fn facts(w: &World, node: &str, silent_ms: u64) -> NodeFacts {
    let now = Instant::now() + Duration::from_secs(3600);
    let replicas: BTreeMap<ObjectName, ReplicaView> =
        w.replicas().into_iter().filter(|r| r.binds(&name(node))).map(|r| (r.name.clone(), r)).collect();
    let others = w.nodes().into_iter().filter(|n| n.name != name(node)).map(|n| (n.name.clone(), n)).collect();
    NodeFacts {
        node: w.get_node(node),
        replicas,
        others,
        last_seen: now - Duration::from_millis(silent_ms),
        unhealthy_gpus: None,
        gpu_reports: None,
        now,
        wall_unix_ms: WALL_MS,
    }
}

#[test]
fn ttl_makes_a_node_not_ready_then_grace_unbinds_its_replicas() {
    let cfg = ActorsConfig::default();
    let mut w = World::default();
    w.node("a", 4, "A");
    w.replica("m-1", "m", 2, ReplicaPhase::Ready, Some(("a", vec![0, 1])));
    w.replica("m-2", "m", 1, ReplicaPhase::Failed, Some(("a", vec![2])));
    assert!(decide(&facts(&w, "a", 1_000), &cfg).is_empty(), "fresh heartbeat: nothing to do");

    let cmds = decide(&facts(&w, "a", cfg.node_ttl_ms), &cfg);
    w.apply_all(&cmds);
    let n = w.get_node("a");
    assert_eq!(n.status.state, NodeState::NotReady);
    assert_eq!(n.status.reason, "no heartbeat within the 5000 ms TTL");
    assert_eq!(n.status.last_transition_ms, WALL_MS, "the transition is stamped with the wall clock passed in");
    assert_eq!(n.status.allocations.len(), 2, "still bound during the grace period");
    assert!(decide(&facts(&w, "a", cfg.node_ttl_ms + 1), &cfg).is_empty(), "no rewrite while unchanged");

    let mut later = facts(&w, "a", cfg.node_ttl_ms + cfg.reschedule_grace_ms);
    later.wall_unix_ms = WALL_MS + 60_000;
    let cmds = decide(&later, &cfg);
    assert_eq!(cmds.len(), 1, "one transaction");
    w.apply_all(&cmds);
    assert!(w.get_node("a").status.allocations.is_empty(), "GPUs freed");
    assert_eq!(w.get_node("a").status.last_transition_ms, WALL_MS, "still NotReady: no new transition");
    let left: Vec<String> = w.replicas().iter().map(|r| r.name.to_string()).collect();
    assert_eq!(left, vec!["m-2"], "bound replica deleted, failed one kept for the operator");
    w.assert_consistent();
}

#[test]
fn heartbeat_brings_a_node_back_ready() {
    let cfg = ActorsConfig::default();
    let mut w = World::default();
    w.node("a", 4, "A");
    w.set_node("a", |_, st| st.state = NodeState::NotReady);
    w.apply_all(&decide(&facts(&w, "a", 10), &cfg));
    assert_eq!(w.get_node("a").status.state, NodeState::Ready);
}

#[test]
fn cordon_and_drain_states() {
    let cfg = ActorsConfig::default();
    let mut w = World::default();
    w.node("a", 4, "A");
    w.replica("m-1", "m", 1, ReplicaPhase::Ready, Some(("a", vec![0])));
    w.set_node("a", |sp, _| sp.cordoned = true);
    w.apply_all(&decide(&facts(&w, "a", 10), &cfg));
    assert_eq!(w.get_node("a").status.state, NodeState::Cordoned);
    w.set_node("a", |sp, _| sp.draining = true);
    w.apply_all(&decide(&facts(&w, "a", 10), &cfg));
    let n = w.get_node("a");
    assert_eq!((n.status.state, n.status.reason.as_str()), (NodeState::Draining, "1 replica(s) still on the node"));
    // The replica is stopped and deleted (by the agent session): the node is drained.
    w.apply_all(&[Command::Txn {
        compares: vec![],
        ops: vec![TxnOp::Delete { key: key(Kind::Replica, &name("m-1")) }],
    }]);
    w.set_node("a", |_, st| st.allocations.clear());
    w.apply_all(&decide(&facts(&w, "a", 10), &cfg));
    assert_eq!(w.get_node("a").status.state, NodeState::Drained);
}

#[test]
fn unhealthy_gpus_from_heartbeats_are_recorded() {
    let cfg = ActorsConfig::default();
    let mut w = World::default();
    w.node("a", 4, "A");
    let mut f = facts(&w, "a", 10);
    f.unhealthy_gpus = Some(vec![3]);
    w.apply_all(&decide(&f, &cfg));
    let n = w.get_node("a");
    assert_eq!(n.status.unhealthy_gpus, vec![3]);
    assert_eq!(n.free_gpus(), 3);
}

#[test]
fn a_lost_gang_member_drains_the_gang_on_the_others_and_the_last_one_deletes_it() {
    use crate::reports::heartbeat_txn;
    use flotilla_api::pb::EngineReport;
    let cfg = ActorsConfig::default();
    let mut w = World::default();
    for n in ["a", "b", "c"] {
        w.node(n, 2, "A");
    }
    w.gang("g-1", "m", ReplicaPhase::Ready, &[("a", vec![0, 1]), ("b", vec![0, 1]), ("c", vec![0, 1])]);
    // the worker's node b is lost: the gang drains; only b's GPUs are freed (a and c still run it)
    let silent = cfg.node_ttl_ms + cfg.reschedule_grace_ms;
    w.apply_all(&decide(&facts(&w, "b", silent), &cfg));
    let g = w.replicas().into_iter().find(|r| r.name == name("g-1")).unwrap();
    assert_eq!(g.phase(), ReplicaPhase::Draining);
    assert_eq!(g.status.reason, "node b (rank 1 of the gang) was lost");
    assert_eq!(g.status.endpoint, None, "a draining gang is no endpoint");
    assert!(w.get_node("b").status.allocations.is_empty());
    assert_eq!(w.get_node("a").status.allocations.len(), 2);
    // a's agent stopped its member: a frees its GPUs; c still holds, so the gang stays
    let others = |w: &World, me: &str| -> std::collections::HashMap<ObjectName, crate::objects::NodeView> {
        w.nodes().into_iter().filter(|n| n.name != name(me)).map(|n| (n.name.clone(), n)).collect()
    };
    let stopped = std::collections::HashMap::from([(
        "g-1".to_string(),
        EngineReport { replica: "g-1".into(), state: "stopped".into(), ..Default::default() },
    )]);
    let cmd = heartbeat_txn(&w.get_node("a"), &w.replicas(), &stopped, &others(&w, "a")).unwrap();
    w.apply_all(&[cmd]);
    assert!(w.get_node("a").status.allocations.is_empty());
    assert_eq!(w.replicas().len(), 1, "c's member still runs");
    // c's agent runs it no more: the last holder deletes the gang
    let cmd = heartbeat_txn(&w.get_node("c"), &w.replicas(), &Default::default(), &others(&w, "c")).unwrap();
    w.apply_all(&[cmd]);
    assert!(w.replicas().is_empty());
    assert!(w.nodes().iter().all(|n| n.status.allocations.is_empty()));
    w.assert_consistent();
}

#[test]
fn a_lost_node_holding_a_whole_draining_gang_deletes_it() {
    let cfg = ActorsConfig::default();
    let mut w = World::default();
    w.node("a", 1, "A");
    w.node("b", 1, "A");
    w.gang("g-1", "m", ReplicaPhase::Ready, &[("a", vec![0]), ("b", vec![0])]);
    let silent = cfg.node_ttl_ms + cfg.reschedule_grace_ms;
    w.apply_all(&decide(&facts(&w, "a", silent), &cfg));
    assert_eq!(w.replicas()[0].phase(), ReplicaPhase::Draining);
    w.apply_all(&decide(&facts(&w, "b", silent), &cfg));
    assert!(w.replicas().is_empty(), "both members' nodes lost: nothing runs it");
    w.assert_consistent();
}
