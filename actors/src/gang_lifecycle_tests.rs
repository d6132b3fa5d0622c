//! Property test of a gang's life after placement, through the two pure decisions that end
//! it: heartbeats (`reports::heartbeat_txn`, every member's node) and node loss
//! (`node::decide`). For arbitrary gangs on disjoint nodes and arbitrary sequences of lost
//! nodes and heartbeats (a member running, waiting, crashed, failed, stopped or gone), applied
//! to a real store: no GPU is ever held for a replica that does not bind it or that Failed,
//! a live gang holds every member's GPUs, and once every node has either been lost or
//! reported its members gone, no Draining gang and no allocation is left behind.
use std::collections::HashMap;

use flotilla_api::pb::EngineReport;
use flotilla_api::spec::ReplicaPhase;
use proptest::prelude::*;
use tokio::time::{Duration, Instant};

use crate::config::ActorsConfig;
use crate::node::{self, NodeFacts};
use crate::objects::{NodeView, ReplicaView};
use crate::reports::heartbeat_txn;
use crate::testkit::{name, World};

#[derive(Debug, Clone)]
enum Event {
    /// The node's heartbeats stopped past TTL + grace.
    Lost(usize),
    /// The node's agent reports every member it holds in this state ("" = not running it).
    Heartbeat(usize, &'static str),
}

fn event(nodes: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        1 => (0..nodes).prop_map(Event::Lost),
        4 => (0..nodes, prop::sample::select(vec!["", "starting", "ready", "crashed", "failed", "stopped"]))
            .prop_map(|(n, s)| Event::Heartbeat(n, s)),
    ]
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

fn others(w: &World, me: &str) -> HashMap<flotilla_api::ObjectName, NodeView> {
    w.nodes().into_iter().filter(|n| n.name.as_str() != me).map(|n| (n.name.clone(), n)).collect()
}

fn lose(w: &mut World, node: &str) {
    let cfg = ActorsConfig::default();
    let now = Instant::now() + Duration::from_secs(3600);
    let f = NodeFacts {
        node: w.get_node(node),
        replicas: w.replicas().into_iter().filter(|r| r.binds(&name(node))).map(|r| (r.name.clone(), r)).collect(),
        others: others(w, node).into_iter().collect(),
        last_seen: now - Duration::from_millis(cfg.node_ttl_ms + cfg.reschedule_grace_ms),
        unhealthy_gpus: None,
        gpu_reports: None,
        now,
        wall_unix_ms: 1_700_000_000_000,
    };
    w.apply_all(&node::decide(&f, &cfg));
}

fn heartbeat(w: &mut World, node: &str, state: &str) {
    let mine: Vec<ReplicaView> = w.replicas().into_iter().filter(|r| r.binds(&name(node))).collect();
    let reports: HashMap<String, EngineReport> = mine
        .iter()
        .filter(|_| !state.is_empty())
        .map(|r| {
            let e = EngineReport {
                replica: r.name.to_string(),
                state: state.into(),
                endpoint: if state == "ready" { "127.0.0.1:9000".into() } else { String::new() },
                rendezvous: "127.0.0.1:29500".into(),
                ..Default::default()
            };
            (r.name.to_string(), e)
        })
        .collect();
    if let Some(cmd) = heartbeat_txn(&w.get_node(node), &mine, &reports, &others(w, node)) {
        w.apply_all(&[cmd]);
    }
}

/// No allocation for a replica that does not bind it or Failed; a live gang holds all.
fn check(w: &World) {
    w.assert_consistent();
    for r in w.replicas() {
        if matches!(r.phase(), ReplicaPhase::Scheduled | ReplicaPhase::Starting | ReplicaPhase::Ready) {
            for (n, gpus) in r.spec.bindings() {
                let node = w.get_node(n.as_str());
                assert!(gpus.iter().all(|g| node.status.allocations.get(g) == Some(&r.name)), "{} on {n}", r.name);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn gangs_never_leak_gpus_and_always_end(
        sizes in prop::collection::vec(2usize..4, 1..4),
        events in prop::collection::vec(event(9), 0..16),
    ) {
        let mut w = World::default();
        let total: usize = sizes.iter().sum();
        for i in 0..total {
            w.node(&node_name(i), 2, "A");
        }
        let mut next = 0;
        for (g, size) in sizes.iter().enumerate() {
            let members: Vec<(String, Vec<u32>)> = (next..next + size).map(|i| (node_name(i), vec![0, 1])).collect();
            next += size;
            let refs: Vec<(&str, Vec<u32>)> = members.iter().map(|(n, gpus)| (n.as_str(), gpus.clone())).collect();
            w.gang(&format!("g-{g}"), "m", ReplicaPhase::Ready, &refs);
        }
        check(&w);
        let mut lost = vec![false; total];
        for e in events {
            match e {
                Event::Lost(i) if i < total => {
                    lose(&mut w, &node_name(i));
                    lost[i] = true;
                }
                Event::Heartbeat(i, state) if i < total && !lost[i] => heartbeat(&mut w, &node_name(i), state),
                _ => {}
            }
            check(&w);
        }
        // Every gang is told to go (as a scale-down would), then every live agent stops its
        // members: nothing is left, whatever happened before.
        for r in w.replicas() {
            if matches!(r.phase(), ReplicaPhase::Scheduled | ReplicaPhase::Starting | ReplicaPhase::Ready) {
                w.replicas_mut(r.name.as_str(), |_, st| st.phase = ReplicaPhase::Draining);
            }
        }
        for i in (0..total).filter(|i| !lost[*i]) {
            heartbeat(&mut w, &node_name(i), "");
            check(&w);
        }
        let left: Vec<(String, ReplicaPhase)> =
            w.replicas().iter().filter(|r| r.phase() != ReplicaPhase::Failed).map(|r| (r.name.to_string(), r.phase())).collect();
        prop_assert!(left.is_empty(), "left behind: {:?}", left);
        prop_assert!(w.nodes().iter().all(|n| n.status.allocations.is_empty()), "GPUs left allocated");
    }
}
