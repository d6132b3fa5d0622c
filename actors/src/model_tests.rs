//! Tests of the model decision: scale up and down, delete, failed replicas, surge drain,
//! rolling updates and hedged healing.
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
    let down_nodes = w
        .nodes()
        .into_iter()
        .filter(|n| n.status.state == flotilla_api::spec::NodeState::NotReady)
        .map(|n| n.name)
        .collect();
    let failed_gpus = w
        .nodes()
        .into_iter()
        .map(|n| (n.name.clone(), n.status.failed_gpus().collect::<BTreeSet<u32>>()))
        .filter(|(_, f)| !f.is_empty())
        .collect();
    ModelState {
        members: Default::default(),
        name: name(model),
        model: w.get_model(model),
        replicas,
        draining_nodes,
        down_nodes,
        failed_gpus,
        failed_since: HashMap::new(),
        now: Instant::now(),
        pinned_adapters: BTreeMap::new(),
        loaded_adapters: HashMap::new(),
        now_ms: 1_000_000,
        canary_stats: Default::default(),
    }
}

fn phases(w: &World) -> Vec<(String, ReplicaPhase)> {
    w.replicas().into_iter().map(|r| (r.name.to_string(), r.phase())).collect()
}

/// Names new replicas after the highest numbered one, so steps never reuse a live name.
fn fresh(w: &World) -> Counter {
    let numbers = w.replicas().into_iter().filter_map(|r| r.name.as_str().rsplit('-').next()?.parse::<u32>().ok());
    Counter::after(numbers.max().unwrap_or(0))
}

fn step(w: &mut World, model: &str) -> Vec<Command> {
    let cmds = decide(&state(w, model), &ActorsConfig::default(), &mut fresh(w));
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

#[test]
fn a_failed_gpu_surges_a_replacement_before_retiring_the_old_replica() {
    let mut w = World::default();
    w.node("a", 4, "A");
    w.model("m", 2, 1);
    w.replica("m-a", "m", 1, ReplicaPhase::Ready, Some(("a", vec![0])));
    w.replica("m-b", "m", 1, ReplicaPhase::Ready, Some(("a", vec![1])));
    step(&mut w, "m");
    assert!(step(&mut w, "m").is_empty(), "steady");
    // A Degraded GPU keeps its replica.
    w.set_node("a", |_, st| {
        st.gpu_health.insert(
            1,
            flotilla_api::spec::GpuHealth {
                state: flotilla_api::spec::GpuHealthState::Degraded,
                evidence: vec!["thermal throttling".into()],
                since_ms: 1,
            },
        );
    });
    assert!(step(&mut w, "m").is_empty(), "Degraded: the replica stays");
    w.set_node("a", |_, st| st.unhealthy_gpus = vec![1]);
    step(&mut w, "m");
    let p: BTreeMap<String, ReplicaPhase> = phases(&w).into_iter().collect();
    assert_eq!(p["m-b"], ReplicaPhase::Ready, "the replica on the failed GPU keeps serving until replaced");
    assert_eq!(p["m-a"], ReplicaPhase::Ready, "the healthy one is untouched");
    assert_eq!(p["m-00001"], ReplicaPhase::Pending, "replacement asked for");
    assert_eq!(p.len(), 3);
    step(&mut w, "m");
    assert_eq!(phases(&w).len(), 3, "one replacement, not one per tick");
    w.replicas_mut("m-00001", |sp, st| {
        sp.node = Some(name("a"));
        sp.gpus = vec![2];
        st.phase = ReplicaPhase::Starting;
    });
    step(&mut w, "m");
    assert_eq!(phases(&w).into_iter().collect::<BTreeMap<_, _>>()["m-b"], ReplicaPhase::Ready, "not before Ready");
    w.replicas_mut("m-00001", |_, st| st.phase = ReplicaPhase::Ready);
    step(&mut w, "m");
    let r = w.replicas().into_iter().find(|r| r.name == name("m-b")).unwrap();
    assert_eq!((r.phase(), r.status.reason.as_str()), (ReplicaPhase::Draining, "GPU failed"));
    let p: BTreeMap<String, ReplicaPhase> = phases(&w).into_iter().collect();
    assert_eq!((p["m-a"], p["m-00001"]), (ReplicaPhase::Ready, ReplicaPhase::Ready));
}

/// Binds every Pending replica to node `a` (GPU by order) and makes it `phase`.
fn place_all(w: &mut World, phase: ReplicaPhase) {
    let pending: Vec<String> =
        w.replicas().into_iter().filter(|r| r.phase() == ReplicaPhase::Pending).map(|r| r.name.to_string()).collect();
    for (i, n) in pending.iter().enumerate() {
        w.replicas_mut(n, |sp, st| {
            sp.node = Some(name("a"));
            sp.gpus = vec![100 + i as u32];
            st.phase = phase;
        });
    }
}

/// Draining replicas stop (the agent reported them gone).
fn stop_draining(w: &mut World) {
    for r in w.replicas().into_iter().filter(|r| r.phase() == ReplicaPhase::Draining) {
        w.apply(&Command::Delete { key: r.key(), expected_revision: None });
    }
}

fn count(w: &World, f: impl Fn(&ReplicaView) -> bool) -> usize {
    w.replicas().iter().filter(|r| f(r)).count()
}

#[test]
fn a_template_change_rolls_make_before_break_and_records_history() {
    let mut w = World::default();
    w.node("a", 64, "A");
    w.model("m", 4, 1);
    step(&mut w, "m");
    place_all(&mut w, ReplicaPhase::Ready);
    step(&mut w, "m");
    let st = w.get_model("m").unwrap().status;
    assert_eq!((st["rollout"]["state"].as_str(), st["rollout"]["number"].as_u64()), (Some("Complete"), Some(1)));
    let first = st["rollout"]["hash"].as_str().unwrap().to_string();
    // An engine argument changes: replicas roll one at a time (25% surge of 4).
    w.set_model("m", |sp| sp.engine_args = vec!["--max-num-seqs=8".into()]);
    let current = w.get_model("m").unwrap().spec.template().hash();
    assert_ne!(current, first);
    let mut rounds = 0;
    loop {
        let cmds = step(&mut w, "m");
        // each command is its own Raft entry: one that creates comes after every one that
        // retires, so no reader sees the new replicas beside the ones they replace
        let ops = |c: &Command| crate::objects::txn_ops(c).to_vec();
        let creates = |c: &Command| ops(c).iter().any(|o| matches!(o, TxnOp::Put { .. }));
        let retires = |c: &Command| ops(c).iter().any(|o| !matches!(o, TxnOp::Put { .. }));
        if let Some(first_create) = cmds.iter().position(creates) {
            assert!(!cmds[first_create..].iter().any(retires), "a retirement after a create: {cmds:?}");
        }
        let live = |r: &ReplicaView| !matches!(r.phase(), ReplicaPhase::Draining | ReplicaPhase::Stopped);
        let ready = count(&w, |r| r.phase() == ReplicaPhase::Ready);
        assert!(
            ready >= 4,
            "never below desired - max_unavailable (0): {ready} ready: {:?}",
            w.replicas()
                .iter()
                .map(|r| (r.name.to_string(), r.phase(), r.spec.template_hash() == current))
                .collect::<Vec<_>>()
        );
        assert!(count(&w, live) <= 5, "never above desired + max_surge");
        let old = count(&w, |r| live(r) && r.spec.template_hash() != current);
        if old == 0 {
            break;
        }
        stop_draining(&mut w);
        place_all(&mut w, ReplicaPhase::Ready);
        rounds += 1;
        assert!(rounds < 20, "the rollout finishes");
    }
    step(&mut w, "m");
    stop_draining(&mut w);
    assert_eq!(count(&w, |r| r.spec.template_hash() == current && r.phase() == ReplicaPhase::Ready), 4);
    assert_eq!(w.replicas().len(), 4);
    assert!(w.replicas().iter().all(|r| r.spec.engine_args == vec!["--max-num-seqs=8".to_string()]));
    step(&mut w, "m");
    let st = w.get_model("m").unwrap().status;
    assert_eq!(st["rollout"]["state"], "Complete", "{st}");
    assert_eq!(st["rollout"]["number"], 2);
    let templates = st["templates"].as_array().unwrap();
    assert_eq!(templates.len(), 2);
    assert_eq!(templates[0]["hash"], first.as_str());
    assert_eq!(templates[0]["template"]["engine_args"], serde_json::Value::Null, "defaults left out");
    let reasons: Vec<String> = w.store.events_since(0, "model/m", 100).into_iter().map(|e| e.note.reason).collect();
    assert_eq!(reasons.first().map(String::as_str), Some("RolloutStarted"), "{reasons:?}");
    assert_eq!(reasons.last().map(String::as_str), Some("RolloutComplete"), "{reasons:?}");
    assert!(reasons.iter().filter(|r| *r == "RolloutStep").count() >= 4, "one step per replaced replica: {reasons:?}");
}

#[test]
fn scaling_and_routing_changes_roll_nothing() {
    let mut w = World::default();
    w.node("a", 64, "A");
    w.model("m", 2, 1);
    step(&mut w, "m");
    place_all(&mut w, ReplicaPhase::Ready);
    step(&mut w, "m");
    w.set_model("m", |sp| {
        sp.replicas = 3;
        sp.routing = flotilla_api::spec::RoutingStrategy::RoundRobin;
    });
    step(&mut w, "m");
    assert_eq!(count(&w, |r| r.phase() == ReplicaPhase::Draining), 0);
    assert_eq!(count(&w, |r| r.phase() == ReplicaPhase::Pending), 1, "one more, nothing replaced");
}

#[test]
fn an_updated_replica_counts_as_ready_only_with_its_adapters_loaded() {
    let mut w = World::default();
    w.node("a", 64, "A");
    w.model("m", 1, 1);
    step(&mut w, "m");
    place_all(&mut w, ReplicaPhase::Ready);
    w.set_model("m", |sp| sp.source = "file:///models/m-v2".into());
    step(&mut w, "m");
    // The new replica is Ready and holds a pinned adapter binding its engine has not loaded.
    place_all(&mut w, ReplicaPhase::Ready);
    let new = w.replicas().into_iter().find(|r| r.spec.source.ends_with("v2")).unwrap().name;
    w.replicas_mut(new.as_str(), |sp, _| {
        sp.adapters = vec![flotilla_api::spec::AdapterBinding { name: name("sql"), source: "file:///a".into() }];
    });
    let mut s = state(&w, "m");
    s.pinned_adapters.insert(name("sql"), 1);
    w.apply_all(&decide(&s, &ActorsConfig::default(), &mut fresh(&w)));
    assert_eq!(count(&w, |r| r.phase() == ReplicaPhase::Draining), 0, "the old one keeps serving");
    let st = w.get_model("m").unwrap().status;
    assert_eq!(st["conditions"][1]["reason"], "RollingUpdate");
    // The engine reports it loaded: now the old one drains.
    let mut s = state(&w, "m");
    s.pinned_adapters.insert(name("sql"), 1);
    s.loaded_adapters.insert(new.clone(), BTreeSet::from(["sql".to_string()]));
    w.apply_all(&decide(&s, &ActorsConfig::default(), &mut fresh(&w)));
    let old = w.replicas().into_iter().find(|r| !r.spec.source.ends_with("v2")).unwrap();
    assert_eq!(old.phase(), ReplicaPhase::Draining);
    assert_eq!(old.status.reason, "replaced by the new template");
}

#[test]
fn a_paused_rollout_holds_until_resumed() {
    let mut w = World::default();
    w.node("a", 64, "A");
    w.model("m", 2, 1);
    step(&mut w, "m");
    place_all(&mut w, ReplicaPhase::Ready);
    w.set_model("m", |sp| {
        sp.gpus = 2;
        sp.rollout.paused = true;
    });
    step(&mut w, "m");
    assert_eq!(w.replicas().len(), 2, "nothing created");
    let st = w.get_model("m").unwrap().status;
    assert_eq!(
        (st["rollout"]["state"].as_str(), st["conditions"][1]["reason"].as_str()),
        (Some("Paused"), Some("RolloutPaused"))
    );
    w.set_model("m", |sp| sp.rollout.paused = false);
    step(&mut w, "m");
    assert_eq!(count(&w, |r| r.spec.gpus_needed == 2), 1, "resumed: one surge replica");
}

#[test]
fn a_lost_node_is_hedged_at_once_and_the_surplus_goes_when_it_returns() {
    let mut w = World::default();
    w.node("a", 8, "A");
    w.node("b", 8, "A");
    w.model("m", 1, 1);
    w.replica("m-a", "m", 1, ReplicaPhase::Ready, Some(("a", vec![0])));
    step(&mut w, "m");
    assert_eq!(w.replicas().len(), 1);
    w.set_node("a", |_, st| st.state = flotilla_api::spec::NodeState::NotReady);
    step(&mut w, "m");
    let p: BTreeMap<String, ReplicaPhase> = phases(&w).into_iter().collect();
    assert_eq!(p["m-a"], ReplicaPhase::Ready, "stays bound and routable");
    assert_eq!(p["m-00001"], ReplicaPhase::Pending, "replacement asked for at once");
    let events = w.store.events_since(0, "model/m", 10);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].note.reason, "NodeNotReady");
    assert!(events[0].note.message.contains("m-a on a"), "{}", events[0].note.message);
    assert!(step(&mut w, "m").iter().all(|c| matches!(c, Command::PutStatus { .. })), "one replacement only");
    w.replicas_mut("m-00001", |sp, st| {
        sp.node = Some(name("b"));
        sp.gpus = vec![0];
        st.phase = ReplicaPhase::Ready;
    });
    step(&mut w, "m");
    assert_eq!(w.get_model("m").unwrap().status["ready_replicas"], 1);
    // The node comes back: two Ready replicas for one wanted; the newest goes.
    w.set_node("a", |_, st| st.state = flotilla_api::spec::NodeState::Ready);
    step(&mut w, "m");
    let p: BTreeMap<String, ReplicaPhase> = phases(&w).into_iter().collect();
    assert_eq!((p["m-a"], p["m-00001"]), (ReplicaPhase::Ready, ReplicaPhase::Draining));
}

fn canary_model(w: &mut World) {
    w.node("a", 64, "A");
    w.model("m", 4, 1);
    step(w, "m");
    place_all(w, ReplicaPhase::Ready);
    step(w, "m");
    w.set_model("m", |sp| {
        sp.source = "file:///models/m-v2".into();
        sp.rollout.canary = Some(flotilla_api::spec::CanarySpec {
            steps: vec![25, 100],
            interval: flotilla_api::spec::SpecDuration::from_secs(60),
            ..Default::default()
        });
    });
}

/// One round at wall time `now_ms` with the given (new, old) figures.
fn canary_round(w: &mut World, now_ms: u64, new: (u64, u64, f64), old: (u64, u64, f64)) -> serde_json::Value {
    let mut s = state(w, "m");
    s.now_ms = now_ms;
    let st = |(requests, errors, ttft_p95_ms): (u64, u64, f64)| canary::RevisionStats { requests, errors, ttft_p95_ms };
    s.canary_stats = (st(new), st(old));
    w.apply_all(&decide(&s, &ActorsConfig::default(), &mut fresh(w)));
    w.get_model("m").unwrap().status["rollout"].clone()
}

fn new_template(r: &ReplicaView) -> bool {
    r.spec.source.ends_with("v2") && !matches!(r.phase(), ReplicaPhase::Draining)
}

#[test]
fn a_healthy_canary_takes_its_share_then_is_promoted_and_rolls() {
    let mut w = World::default();
    canary_model(&mut w);
    let roll = canary_round(&mut w, 1_000_000, (0, 0, 0.0), (0, 0, 0.0));
    assert_eq!((roll["canary"]["state"].as_str(), roll["canary"]["weight"].as_u64()), (Some("Running"), Some(25)));
    assert_eq!(count(&w, new_template), 1, "25% of 4");
    place_all(&mut w, ReplicaPhase::Ready);
    let good = (40, 0, 100.0);
    let roll = canary_round(&mut w, 1_030_000, good, (400, 0, 100.0));
    assert_eq!(roll["canary"]["step"], 0, "mid-step");
    let roll = canary_round(&mut w, 1_061_000, good, (400, 0, 100.0));
    assert_eq!((roll["canary"]["step"].as_u64(), roll["canary"]["weight"].as_u64()), (Some(1), Some(100)));
    assert_eq!(count(&w, new_template), 4, "100%: every replica's worth");
    assert_eq!(count(&w, |r| r.phase() == ReplicaPhase::Draining), 0, "the old ones stay until promoted");
    place_all(&mut w, ReplicaPhase::Ready);
    let roll = canary_round(&mut w, 1_122_000, good, (0, 0, 0.0));
    assert_eq!(roll["canary"]["state"], "Promoted");
    assert_eq!(count(&w, |r| r.phase() == ReplicaPhase::Draining), 4, "promoted: the old ones retire");
    let reasons: Vec<String> = w.store.events_since(0, "model/m", 100).into_iter().map(|e| e.note.reason).collect();
    assert!(
        reasons.contains(&"CanaryStep".to_string()) && reasons.contains(&"CanaryPromoted".to_string()),
        "{reasons:?}"
    );
}

#[test]
fn a_failing_canary_is_rolled_back_with_the_reason_and_stays_back() {
    let mut w = World::default();
    canary_model(&mut w);
    canary_round(&mut w, 1_000_000, (0, 0, 0.0), (0, 0, 0.0));
    place_all(&mut w, ReplicaPhase::Ready);
    let roll = canary_round(&mut w, 1_061_000, (40, 0, 900.0), (400, 0, 100.0));
    assert_eq!(roll["state"], "RolledBack", "{roll}");
    assert!(roll["message"].as_str().unwrap().contains("TTFT p95 900 ms"), "{roll}");
    assert_eq!(count(&w, new_template), 0, "its replicas retire");
    assert_eq!(count(&w, |r| r.phase() == ReplicaPhase::Ready && !r.spec.source.ends_with("v2")), 4, "old ones serve");
    let st = w.get_model("m").unwrap().status;
    let last = st["templates"].as_array().unwrap().last().unwrap().clone();
    assert!(last["rolled_back"].as_str().unwrap().contains("TTFT"), "{last}");
    let roll = canary_round(&mut w, 2_000_000, (0, 0, 0.0), (0, 0, 0.0));
    assert_eq!(
        (roll["state"].as_str(), count(&w, new_template)),
        (Some("RolledBack"), 0),
        "no retry of the same template"
    );
    let events = w.store.events_since(0, "model/m", 100);
    assert!(events.iter().any(|e| e.note.reason == "CanaryRolledBack"), "{events:?}");
}
