//! Tests of the model decision: scale up and down, delete, failed replicas, surge drain.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use flotilla_api::spec::ReplicaPhase;
use tokio::time::Instant;

use super::*;
use crate::testkit::{name, Counter, World};

fn state(w: &World, model: &str) -> ModelState {
    let replicas: BTreeMap<_, _> =
        w.replicas().into_iter().filter(|r| r.spec.model == name(model)).map(|r| (r.name.clone(), r)).collect();
    let draining_nodes = w.nodes().into_iter().filter(|n| n.spec.draining).map(|n| n.name).collect();
    ModelState {
        name: name(model),
        model: w.get_model(model),
        replicas,
        draining_nodes,
        down_nodes: BTreeSet::new(),
        failed_since: HashMap::new(),
        now: Instant::now(),
    }
}

fn phases(w: &World) -> Vec<(String, ReplicaPhase)> {
    w.replicas().into_iter().map(|r| (r.name.to_string(), r.phase())).collect()
}

fn step(w: &mut World, model: &str) -> Vec<Command> {
    let cmds = decide(&state(w, model), &ActorsConfig::default(), &mut Counter::default());
    w.apply_all(&cmds);
    cmds
}

#[test]
fn creates_missing_replicas_in_one_txn_then_is_quiet() {
    let mut w = World::default();
    w.model("llama", 3, 1);
    let cmds = decide(&state(&w, "llama"), &ActorsConfig::default(), &mut Counter::default());
    assert_eq!(cmds.len(), 2, "one create txn and the status: {cmds:?}");
    let Command::Txn { compares, ops } = &cmds[0] else { panic!("{cmds:?}") };
    assert_eq!(compares.len(), 1, "fenced by the model's revision");
    assert_eq!(ops.len(), 3);
    w.apply_all(&cmds);
    let names: Vec<String> = phases(&w).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["llama-00001", "llama-00002", "llama-00003"]);
    assert!(phases(&w).iter().all(|(_, p)| *p == ReplicaPhase::Pending));
    let status = w.get_model("llama").unwrap().status;
    assert_eq!(status["desired_replicas"], 3);
    assert_eq!(status["ready_replicas"], 0);
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "False");
    assert!(step(&mut w, "llama").is_empty(), "nothing more to do");
}

#[test]
fn scale_down_retires_pending_then_newest_and_least_ready() {
    let mut w = World::default();
    w.node("a", 8, "A");
    w.model("m", 5, 1);
    w.replica("m-a", "m", 1, ReplicaPhase::Ready, Some(("a", vec![0])));
    w.replica("m-b", "m", 1, ReplicaPhase::Ready, Some(("a", vec![1])));
    w.replica("m-c", "m", 1, ReplicaPhase::Starting, Some(("a", vec![2])));
    w.replica("m-d", "m", 1, ReplicaPhase::Pending, None);
    w.replica("m-e", "m", 1, ReplicaPhase::Ready, Some(("a", vec![3])));
    w.set_model_replicas("m", 2);
    step(&mut w, "m");
    let p: BTreeMap<String, ReplicaPhase> = phases(&w).into_iter().collect();
    assert!(!p.contains_key("m-d"), "pending deleted outright");
    assert_eq!(p["m-c"], ReplicaPhase::Draining, "starting before ready");
    assert_eq!(p["m-e"], ReplicaPhase::Draining, "newest ready next");
    assert_eq!(p["m-a"], ReplicaPhase::Ready);
    assert_eq!(p["m-b"], ReplicaPhase::Ready);
    let st = w.get_model("m").unwrap().status;
    assert_eq!(st["ready_replicas"], 2);
    assert_eq!(st["conditions"][1]["reason"], "Draining");
}

#[test]
fn deleted_model_drains_everything() {
    let mut w = World::default();
    w.node("a", 8, "A");
    w.replica("m-a", "m", 1, ReplicaPhase::Ready, Some(("a", vec![0])));
    w.replica("m-b", "m", 1, ReplicaPhase::Pending, None);
    w.replica("m-c", "m", 1, ReplicaPhase::Draining, Some(("a", vec![1])));
    step(&mut w, "m");
    assert_eq!(phases(&w), vec![("m-a".into(), ReplicaPhase::Draining), ("m-c".into(), ReplicaPhase::Draining)]);
    assert!(step(&mut w, "m").is_empty());
}

#[test]
fn failed_replicas_hold_their_slot_during_backoff_then_are_replaced() {
    let mut w = World::default();
    w.node("a", 8, "A");
    w.model("m", 1, 1);
    w.replica("m-a", "m", 1, ReplicaPhase::Failed, Some(("a", vec![0])));
    let cfg = ActorsConfig::default();
    let mut s = state(&w, "m");
    s.failed_since.insert(name("m-a"), s.now);
    let cmds = decide(&s, &cfg, &mut Counter::default());
    assert_eq!(cmds.len(), 1, "status only: {cmds:?}");
    assert!(w.apply_all_ok(&cmds));
    let st = w.get_model("m").unwrap().status;
    assert_eq!(st["conditions"][0]["reason"], "ReplicaFailed");
    let mut s = state(&w, "m");
    s.failed_since.insert(name("m-a"), s.now);
    s.now += Duration::from_millis(cfg.failed_replace_backoff_ms);
    let cmds = decide(&s, &cfg, &mut Counter::default());
    w.apply_all(&cmds);
    let p: BTreeMap<String, ReplicaPhase> = phases(&w).into_iter().collect();
    assert_eq!(p["m-a"], ReplicaPhase::Failed, "kept for the operator");
    assert_eq!(p["m-00001"], ReplicaPhase::Pending, "replacement created");
}

#[test]
fn drain_surges_a_replacement_before_retiring_the_old_replica() {
    let mut w = World::default();
    w.node("old", 8, "A");
    w.node("new", 8, "A");
    w.model("m", 1, 1);
    w.replica("m-a", "m", 1, ReplicaPhase::Ready, Some(("old", vec![0])));
    w.set_node("old", |sp, _| {
        sp.cordoned = true;
        sp.draining = true;
    });
    step(&mut w, "m");
    let p: BTreeMap<String, ReplicaPhase> = phases(&w).into_iter().collect();
    assert_eq!(p["m-a"], ReplicaPhase::Ready, "old one keeps serving");
    assert_eq!(p["m-00001"], ReplicaPhase::Pending, "replacement asked for");
    // The replacement is placed and becomes Ready: only then the old one drains.
    w.replicas_mut("m-00001", |sp, st| {
        sp.node = Some(name("new"));
        sp.gpus = vec![0];
        st.phase = ReplicaPhase::Ready;
    });
    step(&mut w, "m");
    let p: BTreeMap<String, ReplicaPhase> = phases(&w).into_iter().collect();
    assert_eq!(p["m-a"], ReplicaPhase::Draining);
    assert_eq!(p["m-00001"], ReplicaPhase::Ready);
}
