//! The GPU health policy end to end over the pure decisions and a real in-memory store:
//! agent reports → node decision (status) → placement (no new replica on a Degraded or
//! Failed GPU) → model decision (make-before-break off a Failed GPU) → recovery.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use flotilla_api::pb::GpuInfo;
use flotilla_api::spec::{GpuHealthState, ReplicaPhase};
use tokio::time::Instant;

use super::*;
use crate::config::ActorsConfig;
use crate::config::PlacementStrategy;
use crate::model::{self, ModelState};
use crate::node::{self, NodeFacts};
use crate::placement::plan;
use crate::testkit::{name, Counter, World};

const WALL_MS: u64 = 1_700_000_000_000;

/// The node actor's decision after a heartbeat carrying `gpus`.
fn heartbeat(w: &mut World, node_name: &str, gpus: &[GpuInfo], wall: u64) {
    let now = Instant::now();
    let reps = reports(gpus);
    let f = NodeFacts {
        node: w.get_node(node_name),
        replicas: w
            .replicas()
            .into_iter()
            .filter(|r| r.spec.node == Some(name(node_name)))
            .map(|r| (r.name.clone(), r))
            .collect(),
        others: Default::default(),
        last_seen: now - Duration::from_millis(10),
        unhealthy_gpus: Some(failed(&reps)),
        gpu_reports: Some(reps),
        now,
        wall_unix_ms: wall,
    };
    let cmds = node::decide(&f, &ActorsConfig::default());
    w.apply_all(&cmds);
}

fn gpus(states: &[(&str, &[&str])]) -> Vec<GpuInfo> {
    states
        .iter()
        .enumerate()
        .map(|(i, (state, evidence))| GpuInfo {
            index: i as u32,
            gpu_type: "A".into(),
            state: state.to_string(),
            healthy: *state != "failed",
            evidence: evidence.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .collect()
}

fn model_step(w: &mut World, counter: &mut Counter) {
    let nodes = crate::facts::BoundNodes::of(&w.replicas(), |n| w.nodes().into_iter().find(|v| &v.name == n));
    let s = ModelState {
        members: Default::default(),
        name: name("m"),
        model: w.get_model("m"),
        replicas: w.replicas().into_iter().map(|r| (r.name.clone(), r)).collect(),
        draining_nodes: nodes.draining,
        down_nodes: nodes.down,
        failed_gpus: nodes.failed_gpus,
        failed_since: HashMap::new(),
        now: Instant::now(),
        pinned_adapters: BTreeMap::new(),
        loaded_adapters: HashMap::new(),
        now_ms: WALL_MS,
        canary_stats: Default::default(),
    };
    let cmds = model::decide(&s, &ActorsConfig::default(), counter);
    w.apply_all(&cmds);
}

fn schedule(w: &mut World) {
    let p = plan(&w.nodes(), &w.replicas(), PlacementStrategy::BinPack, &BTreeSet::new(), 512);
    w.apply_all(&p.binds);
    if let Some(r) = &p.reasons {
        w.apply_all(std::slice::from_ref(r));
    }
}

fn bound(w: &World) -> BTreeMap<String, (ReplicaPhase, Vec<u32>)> {
    w.replicas().into_iter().map(|r| (r.name.to_string(), (r.phase(), r.spec.gpus.clone()))).collect()
}

#[test]
fn xid_79_fails_a_gpu_its_replica_moves_before_it_retires_and_nothing_new_lands_on_it() {
    let mut w = World::default();
    w.node("a", 3, "A");
    w.model("m", 1, 1);
    w.replica("m-old", "m", 1, ReplicaPhase::Ready, Some(("a", vec![1])));
    let xid = "xid 79 (fallen off the bus) at 20:31:07";
    heartbeat(&mut w, "a", &gpus(&[("healthy", &[]), ("failed", &[xid]), ("healthy", &[])]), WALL_MS);
    let st = w.get_node("a").status;
    assert_eq!(st.unhealthy_gpus, vec![1]);
    assert_eq!(st.gpu_health[&1].state, GpuHealthState::Failed);
    assert_eq!(st.gpu_health[&1].evidence, vec![xid.to_string()]);
    assert_eq!(st.gpu_health[&1].since_ms, WALL_MS);
    assert_eq!(st.gpu_health.len(), 1, "healthy GPUs are not recorded");

    let mut counter = Counter::default();
    model_step(&mut w, &mut counter);
    schedule(&mut w);
    let b = bound(&w);
    assert_eq!(b["m-old"], (ReplicaPhase::Ready, vec![1]), "the old replica serves until replaced");
    let (new, (phase, on)) =
        b.iter().find(|(n, _)| n.as_str() != "m-old").map(|(n, v)| (n.clone(), v.clone())).unwrap();
    assert_eq!(phase, ReplicaPhase::Scheduled);
    assert_ne!(on, vec![1], "never on the failed GPU");
    w.replicas_mut(&new, |_, st| st.phase = ReplicaPhase::Ready);
    model_step(&mut w, &mut counter);
    let b = bound(&w);
    assert_eq!(b["m-old"].0, ReplicaPhase::Draining, "retired once the replacement is Ready");
    // The old replica stops; its GPU is freed but stays out of placement while Failed.
    w.apply(&flotilla_storage::Command::Delete {
        key: crate::objects::key(flotilla_api::Kind::Replica, &name("m-old")),
        expected_revision: None,
    });
    w.set_node("a", |_, st| {
        st.allocations.remove(&1);
    });
    w.set_model_replicas("m", 2);
    model_step(&mut w, &mut counter);
    schedule(&mut w);
    let used: Vec<Vec<u32>> = bound(&w).values().map(|(_, g)| g.clone()).collect();
    assert!(!used.contains(&vec![1]), "{used:?}");
    assert_eq!(used.len(), 2);
}

#[test]
fn a_degraded_gpu_keeps_its_replica_takes_no_new_one_and_recovers() {
    let mut w = World::default();
    w.node("a", 2, "A");
    w.model("m", 1, 1);
    w.replica("m-old", "m", 1, ReplicaPhase::Ready, Some(("a", vec![0])));
    heartbeat(&mut w, "a", &gpus(&[("healthy", &[]), ("degraded", &["thermal throttling"])]), WALL_MS);
    let st = w.get_node("a").status;
    assert!(st.unhealthy_gpus.is_empty(), "Degraded is not Failed");
    assert_eq!(st.gpu_health[&1].state, GpuHealthState::Degraded);
    let mut counter = Counter::default();
    model_step(&mut w, &mut counter);
    assert_eq!(bound(&w).len(), 1, "no replacement for a Degraded GPU");
    w.set_model_replicas("m", 2);
    model_step(&mut w, &mut counter);
    schedule(&mut w);
    let pending = w.replicas().into_iter().find(|r| r.name.as_str() != "m-old").unwrap();
    assert_eq!(pending.phase(), ReplicaPhase::Pending, "GPU 1 is the only free one and it is Degraded");
    assert_eq!(pending.status.reason, "no node has 1 free GPU: 1 has 0 free");
    // The agent's classifier reports healthy again (after its clean probes): placement resumes.
    heartbeat(&mut w, "a", &gpus(&[("healthy", &[]), ("healthy", &[])]), WALL_MS + 5000);
    assert!(w.get_node("a").status.gpu_health.is_empty());
    schedule(&mut w);
    assert_eq!(bound(&w)[pending.name.as_str()], (ReplicaPhase::Scheduled, vec![1]));
}

#[test]
fn an_older_agent_reporting_only_healthy_false_still_fails_the_gpu() {
    let mut w = World::default();
    w.node("a", 2, "A");
    let old = vec![GpuInfo {
        index: 1,
        healthy: false,
        health_reason: "3 uncorrected ECC errors".into(),
        ..Default::default()
    }];
    heartbeat(&mut w, "a", &old, WALL_MS);
    let st = w.get_node("a").status;
    assert_eq!(st.unhealthy_gpus, vec![1]);
    assert_eq!(st.gpu_health[&1].evidence, vec!["3 uncorrected ECC errors".to_string()]);
}
