use std::collections::{BTreeMap, BTreeSet, HashMap};

use flotilla_api::pb::{AdapterReport, EngineReport};
use flotilla_api::spec::{AdapterBinding, AdapterPhase, AdapterReplicaState, ReplicaPhase};
use flotilla_api::{Kind, LabelSelector};
use serde_json::json;
use tokio::time::Instant;

use super::*;
use crate::testkit::{name, World};

/// A world with base model `m` (sim engine with `args`) and Ready replicas `r1..=rN`.
fn world(replicas: usize, args: &[&str]) -> World {
    let mut w = World::default();
    w.node("n", 8, "A");
    w.model("m", replicas as u32, 1);
    let mut spec = w.get_model("m").unwrap().spec;
    spec.engine_args = args.iter().map(|s| s.to_string()).collect();
    w.put(Kind::Model, "m", BTreeMap::new(), json!(spec), serde_json::Value::Null);
    for i in 1..=replicas {
        w.replica(&format!("r{i}"), "m", 1, ReplicaPhase::Ready, Some(("n", vec![i as u32 - 1])));
        w.replicas_mut(&format!("r{i}"), |sp, _| sp.engine_args = spec.engine_args.clone());
    }
    w
}

fn adapter(w: &mut World, n: &str, replicas: serde_json::Value) {
    let spec = json!({"base_model": "m", "source": format!("sim://{n}"), "replicas": replicas});
    w.put(Kind::Adapter, n, BTreeMap::new(), spec, serde_json::Value::Null);
}

fn state(w: &World, now: Instant) -> AdapterState {
    let all = LabelSelector::default();
    AdapterState {
        base: name("m"),
        model: w.get_model("m"),
        adapters: w
            .store
            .list(Kind::Adapter, &all)
            .iter()
            .map(|o| AdapterView::from_stored(o).unwrap())
            .map(|a| (a.name.clone(), a))
            .collect(),
        replicas: w.replicas().into_iter().map(|r| (r.name.clone(), r)).collect(),
        down_nodes: BTreeSet::new(),
        reports: HashMap::new(),
        last_used: HashMap::new(),
        bound_at: HashMap::new(),
        in_flight: BTreeSet::new(),
        gateways_count: false,
        demands: BTreeMap::new(),
        failures: HashMap::new(),
        now,
    }
}

/// Adapter names bound per replica.
fn bound(w: &World) -> BTreeMap<String, Vec<String>> {
    w.replicas()
        .into_iter()
        .map(|r| (r.name.to_string(), r.spec.adapters.iter().map(|b| b.name.to_string()).collect()))
        .collect()
}

fn status(w: &World, n: &str) -> AdapterStatus {
    let o = w.store.get(&key(Kind::Adapter, &name(n))).unwrap();
    AdapterView::from_stored(o).unwrap().status.expect("status written")
}

/// Reports every bound adapter as loaded by its engine.
fn all_loaded(w: &World, s: &mut AdapterState) {
    for r in w.replicas() {
        let loaded = r.spec.adapters.iter().map(|b| b.name.to_string()).collect();
        s.reports.insert(r.name.clone(), EngineReport { loaded_adapters: loaded, ..Default::default() });
    }
}

fn run(w: &mut World, s: &AdapterState) -> Plan {
    let plan = decide(s);
    assert!(w.apply_all_ok(&plan.commands), "a decision's writes apply on the state it saw");
    plan
}

#[test]
fn pinned_adapters_spread_and_never_exceed_the_slots() {
    let mut w = world(2, &["--max-loras", "1", "--max-cpu-loras", "2"]);
    for a in ["a", "b", "c", "d", "e"] {
        adapter(&mut w, a, json!(1));
    }
    let now = Instant::now();
    let s = state(&w, now);
    run(&mut w, &s);
    let b = bound(&w);
    assert_eq!(b["r1"].len() + b["r2"].len(), 4, "{b:?}");
    assert!(b.values().all(|v| v.len() == 2), "least-adapters spreads: {b:?}");
    let e = status(&w, "e");
    assert_eq!(e.phase, AdapterPhase::Pending);
    assert!(e.replicas.iter().all(|r| r.reason.contains("no free slot")), "{e:?}");
    // Level-triggered: the same world decides nothing more.
    let mut s = state(&w, now);
    all_loaded(&w, &mut s);
    run(&mut w, &s);
    assert_eq!(status(&w, "a").phase, AdapterPhase::Ready);
    assert_eq!(status(&w, "a").loaded_replicas, 1);
    let mut s = state(&w, now);
    all_loaded(&w, &mut s);
    assert!(decide(&s).commands.is_empty(), "steady state writes nothing");
}

#[test]
fn bin_pack_fills_one_replica_first() {
    let mut w = world(2, &["--max-cpu-loras", "3"]);
    for a in ["a", "b"] {
        let spec = json!({"base_model": "m", "source": format!("sim://{a}"), "placement": "bin-pack"});
        w.put(Kind::Adapter, a, BTreeMap::new(), spec, serde_json::Value::Null);
    }
    let s = state(&w, Instant::now());
    run(&mut w, &s);
    let b = bound(&w);
    assert!(b["r1"].len() == 2 && b["r2"].is_empty(), "{b:?}");
}

#[test]
fn on_demand_loads_evict_the_least_recently_used_unpinned_adapter() {
    let mut w = world(1, &["--max-cpu-loras", "2"]);
    for a in ["p", "x", "y", "z"] {
        adapter(&mut w, a, if a == "p" { json!(1) } else { json!("on-demand") });
    }
    let t0 = Instant::now();
    let mut s = state(&w, t0);
    let until = t0 + Duration::from_secs(30);
    s.demands.insert(name("x"), Demand { avoid: BTreeSet::new(), until });
    let plan = run(&mut w, &s);
    assert_eq!(plan.bound.len(), 2, "pinned p and demanded x: {:?}", plan.bound);
    // Once x is loaded its demand is satisfied and dropped (it no longer shields x).
    let mut s2 = state(&w, t0);
    s2.demands.insert(name("x"), Demand { avoid: BTreeSet::new(), until });
    all_loaded(&w, &mut s2);
    note_failures(&mut s2);
    assert!(s2.demands.is_empty(), "a satisfied demand ends");
    assert_eq!(bound(&w)["r1"], ["p", "x"]);
    assert_eq!(status(&w, "y").phase, AdapterPhase::Pending);
    // y is requested while x was bound moments ago: the thrash guard keeps x (p is
    // pinned), the demand stays unplaced until the guard passes, and the actor is told when.
    let t1 = t0 + Duration::from_millis(100);
    let mut s = state(&w, t1);
    s.bound_at.insert((name("x"), name("r1")), t0);
    s.demands.insert(name("y"), Demand { avoid: BTreeSet::new(), until });
    let plan = run(&mut w, &s);
    assert_eq!(bound(&w)["r1"], ["p", "x"]);
    assert_eq!(plan.unplaced[&name("y")].blocked, Blocked::Fresh, "{:?}", plan.unplaced);
    assert_eq!(plan.wake_at, Some(t0 + MIN_RESIDENCY));
    // Once it passes, y evicts x at once, though x was used moments ago: nothing is in
    // flight. Never the pinned p, though p is the least recently used.
    let t2 = t0 + MIN_RESIDENCY;
    let mut s = state(&w, t2);
    s.bound_at.insert((name("x"), name("r1")), t0);
    s.last_used.insert((name("x"), name("r1")), t2 - Duration::from_millis(10));
    s.last_used.insert((name("p"), name("r1")), t0 - Duration::from_secs(100));
    s.demands.insert(name("y"), Demand { avoid: BTreeSet::new(), until });
    let plan = run(&mut w, &s);
    assert_eq!((plan.evictions.len(), plan.unplaced.len(), plan.wake_at), (1, 0, None));
    assert_eq!(bound(&w)["r1"], ["p", "y"]);
    let x = status(&w, "x");
    assert_eq!(x.phase, AdapterPhase::Pending);
    assert!(x.replicas[0].reason.contains("no free slot"), "{x:?}");
}

/// One replica with one slot holding `x` (on demand, bound long ago) and a demand for `y`.
fn one_slot_taken_by_x() -> (World, AdapterState) {
    let mut w = world(1, &["--max-cpu-loras", "1"]);
    adapter(&mut w, "x", json!("on-demand"));
    adapter(&mut w, "y", json!("on-demand"));
    w.replicas_mut("r1", |sp, _| sp.adapters = vec![AdapterBinding { name: name("x"), source: "sim://x".into() }]);
    let now = Instant::now();
    let mut s = state(&w, now);
    s.bound_at.insert((name("x"), name("r1")), now - Duration::from_secs(60));
    s.demands.insert(name("y"), Demand { avoid: BTreeSet::new(), until: now + Duration::from_secs(30) });
    (w, s)
}

#[test]
fn an_adapter_with_requests_in_flight_is_never_evicted() {
    // The gateways count a request in flight for x on r1: y waits, told why.
    let (mut w, mut s) = one_slot_taken_by_x();
    s.gateways_count = true;
    s.in_flight.insert((name("x"), name("r1")));
    s.last_used.insert((name("x"), name("r1")), s.now - Duration::from_secs(600));
    let plan = run(&mut w, &s);
    assert_eq!(bound(&w)["r1"], ["x"]);
    let u = &plan.unplaced[&name("y")];
    assert_eq!(u.blocked, Blocked::InUse);
    assert_eq!(
        u.reason,
        "no free slot: 1 of 1 (--max-cpu-loras) in use; every evictable adapter has requests in flight (x on r1)"
    );
    // The gateways' counts are the truth: the engine still listing x as running (its
    // scrape is older) does not hold it once they say nothing is in flight.
    let (mut w, mut s) = one_slot_taken_by_x();
    s.gateways_count = true;
    s.reports.insert(name("r1"), EngineReport { active_adapters: vec!["x".into()], ..Default::default() });
    run(&mut w, &s);
    assert_eq!(bound(&w)["r1"], ["y"]);
    // Without gateway counts the engine's running and waiting adapters stand in.
    let (mut w, mut s) = one_slot_taken_by_x();
    s.reports.insert(name("r1"), EngineReport { active_adapters: vec!["x".into()], ..Default::default() });
    let plan = run(&mut w, &s);
    assert_eq!((bound(&w)["r1"].clone(), plan.unplaced[&name("y")].blocked), (vec!["x".to_string()], Blocked::InUse));
}

#[test]
fn a_slot_loading_for_another_waiting_request_is_waited_for_not_refused() {
    // x was bound for a demand that its engine has not reported served yet: y waits.
    let (mut w, mut s) = one_slot_taken_by_x();
    let until = s.now + Duration::from_secs(30);
    s.demands.insert(name("x"), Demand { avoid: BTreeSet::new(), until });
    s.bound_at.insert((name("x"), name("r1")), s.now - Duration::from_millis(100));
    let plan = run(&mut w, &s);
    assert_eq!(bound(&w)["r1"], ["x"]);
    assert_eq!(plan.unplaced[&name("y")].blocked, Blocked::Fresh);
    assert_eq!(plan.wake_at, Some(s.now - Duration::from_millis(100) + MIN_RESIDENCY));
    // A load that outlasts the guard is checked again shortly.
    s.bound_at.insert((name("x"), name("r1")), s.now - Duration::from_secs(5));
    let plan = decide(&s);
    assert_eq!(plan.wake_at, Some(s.now + Duration::from_millis(100)));
}

#[test]
fn a_demand_with_every_slot_pinned_is_unplaced_at_once_with_the_reason() {
    let mut w = world(2, &["--max-cpu-loras", "1"]);
    for a in ["a", "b", "c"] {
        adapter(&mut w, a, json!(1));
    }
    let now = Instant::now();
    let s = state(&w, now);
    run(&mut w, &s);
    let c = status(&w, "c");
    assert_eq!(c.phase, AdapterPhase::Pending, "two slots, three pinned adapters: {c:?}");
    assert_eq!(c.reason, "loaded on 0 of 1 replicas; no free slot: 1 of 1 (--max-cpu-loras) in use");
    let mut s = state(&w, now);
    all_loaded(&w, &mut s);
    s.demands.insert(name("c"), Demand { avoid: BTreeSet::new(), until: now + Duration::from_secs(30) });
    let plan = run(&mut w, &s);
    let u = &plan.unplaced[&name("c")];
    assert_eq!(u.blocked, Blocked::Full);
    assert_eq!(u.reason, "no free slot: 1 of 1 (--max-cpu-loras) in use; every slot holds a pinned adapter");
    assert!(c.replicas.iter().all(|r| u.reason.starts_with(&r.reason)), "the words of get adapter: {c:?}");
    assert_eq!(plan.wake_at, None);
    // A third replica starting will have room: the demand waits for it instead.
    w.replica("r3", "m", 1, ReplicaPhase::Starting, Some(("n", vec![2])));
    let args = w.get_model("m").unwrap().spec.engine_args;
    w.replicas_mut("r3", |sp, _| sp.engine_args = args);
    let mut s = state(&w, now);
    all_loaded(&w, &mut s);
    s.demands.insert(name("c"), Demand { avoid: BTreeSet::new(), until: now + Duration::from_secs(30) });
    assert_eq!(decide(&s).unplaced[&name("c")].blocked, Blocked::NoReplica);
    w.apply(&Command::Delete { key: key(Kind::Replica, &name("r3")), expected_revision: None });
    // No ready replica at all: said so.
    for r in ["r1", "r2"] {
        w.replicas_mut(r, |_, st| st.phase = ReplicaPhase::Starting);
    }
    let mut s = state(&w, now);
    s.demands.insert(name("c"), Demand { avoid: BTreeSet::new(), until: now + Duration::from_secs(30) });
    let plan = decide(&s);
    assert_eq!(plan.unplaced[&name("c")].reason, "base model m has no ready replica");
}

/// Loads per second stay within the documented bound (one per slot per `MIN_RESIDENCY`)
/// when more adapters are hot than there are slots: 6 adapters on 2 one-slot replicas,
/// each 10 ms a demand for one not loaded, loads instant, nothing in flight.
#[test]
fn thrashing_stays_within_one_load_per_slot_per_min_residency() {
    let mut w = world(2, &["--max-cpu-loras", "1"]);
    let names: Vec<String> = (0..6).map(|i| format!("hot{i}")).collect();
    for n in &names {
        adapter(&mut w, n, json!("on-demand"));
    }
    let t0 = Instant::now();
    let step = Duration::from_millis(10);
    let secs = 10u32;
    let (mut demands, mut bound_at, mut loads) = (BTreeMap::new(), HashMap::new(), 0usize);
    for i in 0..(secs * 100) {
        let now = t0 + step * i;
        let b = bound(&w);
        let want = names.iter().cycle().skip(i as usize).find(|n| !b.values().flatten().any(|x| x == *n)).unwrap();
        demands.entry(name(want)).or_insert(Demand { avoid: BTreeSet::new(), until: now + Duration::from_secs(30) });
        let mut s = state(&w, now);
        all_loaded(&w, &mut s);
        s.demands = demands.clone();
        s.bound_at = bound_at.clone();
        note_failures(&mut s);
        demands = s.demands.clone();
        let plan = run(&mut w, &s);
        for p in &plan.bound {
            bound_at.insert(p.clone(), now);
        }
        loads += plan.bound.len();
    }
    let slots = 2;
    let bound_loads = slots * (secs as usize * 1000 / MIN_RESIDENCY.as_millis() as usize) + slots;
    assert!(loads <= bound_loads, "{loads} loads in {secs} s, bound {bound_loads}");
    assert!(loads >= bound_loads / 2, "and it does swap: {loads}");
}

#[test]
fn a_demand_avoiding_a_saturated_holder_scales_the_adapter_out() {
    let mut w = world(2, &["--max-cpu-loras", "4"]);
    adapter(&mut w, "hot", json!(1));
    let now = Instant::now();
    let s = state(&w, now);
    run(&mut w, &s);
    let first: Vec<String> = bound(&w).into_iter().filter(|(_, v)| !v.is_empty()).map(|(r, _)| r).collect();
    assert_eq!(first.len(), 1);
    let mut s = state(&w, now);
    all_loaded(&w, &mut s);
    s.demands.insert(name("hot"), Demand { avoid: [name(&first[0])].into(), until: now + Duration::from_secs(30) });
    run(&mut w, &s);
    assert!(bound(&w).values().all(|v| v == &["hot"]), "{:?}", bound(&w));
}

#[test]
fn a_failed_load_moves_to_another_replica_then_the_adapter_fails_with_the_engine_message() {
    let mut w = world(2, &["--max-cpu-loras", "2"]);
    adapter(&mut w, "bad", json!(1));
    let now = Instant::now();
    let s = state(&w, now);
    run(&mut w, &s);
    let fail = |w: &World, s: &mut AdapterState| {
        for r in w.replicas().iter().filter(|r| !r.spec.adapters.is_empty()) {
            let report = AdapterReport {
                name: "bad".into(),
                state: "failed".into(),
                reason: "Loading lora bad failed: No adapter found for /nope".into(),
                load_ms: 0,
            };
            s.reports.insert(r.name.clone(), EngineReport { adapters: vec![report], ..Default::default() });
        }
    };
    let mut s = state(&w, now);
    fail(&w, &mut s);
    note_failures(&mut s);
    run(&mut w, &s);
    let b = bound(&w);
    assert_eq!(b.values().filter(|v| !v.is_empty()).count(), 1, "retried on the other replica: {b:?}");
    assert_eq!(status(&w, "bad").phase, AdapterPhase::Loading);
    let failures = s.failures.clone();
    let mut s = state(&w, now);
    s.failures = failures;
    fail(&w, &mut s);
    note_failures(&mut s);
    run(&mut w, &s);
    assert!(bound(&w).values().all(Vec::is_empty));
    let st = status(&w, "bad");
    assert_eq!(st.phase, AdapterPhase::Failed);
    assert!(st.reason.contains("No adapter found"), "{st:?}");
    assert!(st.replicas.iter().all(|r| r.state == AdapterReplicaState::Failed));
    // After the backoff it is tried again.
    let failures = s.failures.clone();
    let mut s = state(&w, now + FAILURE_BACKOFF);
    s.failures = failures;
    note_failures(&mut s);
    run(&mut w, &s);
    assert_eq!(bound(&w).values().filter(|v| !v.is_empty()).count(), 1);
}

#[test]
fn lost_replicas_deleted_adapters_and_missing_base_models() {
    let mut w = world(2, &["--max-cpu-loras", "2"]);
    adapter(&mut w, "a", json!(1));
    adapter(&mut w, "gone", json!(1));
    let now = Instant::now();
    let s = state(&w, now);
    run(&mut w, &s);
    let holder = bound(&w).into_iter().find(|(_, v)| v.contains(&"a".to_string())).unwrap().0;
    // The replica holding `a` is lost (drained): `a` is placed on the other one.
    w.replicas_mut(&holder, |_, st| st.phase = ReplicaPhase::Draining);
    w.apply(&Command::Delete { key: key(Kind::Adapter, &name("gone")), expected_revision: None });
    let s = state(&w, now);
    run(&mut w, &s);
    let b = bound(&w);
    let other = if holder == "r1" { "r2" } else { "r1" };
    assert_eq!(b[other], ["a"], "{b:?}");
    assert!(!b[other].contains(&"gone".to_string()));
    // Base model deleted: Failed, and no replica keeps bindings.
    w.apply(&Command::Delete { key: key(Kind::Model, &name("m")), expected_revision: None });
    let s = state(&w, now);
    run(&mut w, &s);
    assert!(bound(&w).values().all(Vec::is_empty));
    let st = status(&w, "a");
    assert_eq!(st.phase, AdapterPhase::Failed);
    assert!(st.reason.contains("base model m does not exist"), "{st:?}");
}

#[test]
fn a_base_model_without_lora_or_with_a_lower_rank_fails_the_adapter() {
    let mut w = world(1, &["--disable-lora"]);
    adapter(&mut w, "a", json!(1));
    let s = state(&w, Instant::now());
    run(&mut w, &s);
    assert!(bound(&w)["r1"].is_empty());
    let st = status(&w, "a");
    assert_eq!(st.phase, AdapterPhase::Failed);
    assert!(st.reason.contains("--enable-lora"), "{st:?}");
}

#[test]
fn adapters_on_a_lost_node_are_placed_again_at_once() {
    let mut w = World::default();
    w.node("n1", 1, "A");
    w.node("n2", 1, "A");
    w.model("m", 2, 1);
    w.replica("r1", "m", 1, ReplicaPhase::Ready, Some(("n1", vec![0])));
    w.replica("r2", "m", 1, ReplicaPhase::Ready, Some(("n2", vec![0])));
    adapter(&mut w, "a", json!(1));
    let now = Instant::now();
    let s = state(&w, now);
    run(&mut w, &s);
    let holder = w.replicas().into_iter().find(|r| !r.spec.adapters.is_empty()).unwrap();
    let node = holder.spec.node.clone().unwrap();
    let mut s = state(&w, now);
    s.down_nodes.insert(node.clone());
    let mut d = BTreeMap::new();
    d.insert(name("a"), Demand { avoid: BTreeSet::new(), until: now + Duration::from_secs(9) });
    s.demands = d;
    run(&mut w, &s);
    let b = bound(&w);
    assert!(b.values().all(|v| v == &["a"]), "placed on the live replica too: {b:?}");
    let st = status(&w, "a");
    let lost = st.replicas.iter().find(|r| r.replica == holder.name).unwrap();
    assert!(lost.reason.contains(&format!("node {node} is not ready")), "{st:?}");
}

#[test]
fn a_rollout_moves_pinned_adapters_to_the_new_template_before_the_old_holders_go() {
    let mut w = world(1, &["--max-cpu-loras", "2"]);
    adapter(&mut w, "a", json!(1));
    let now = Instant::now();
    let s = state(&w, now);
    run(&mut w, &s);
    assert_eq!(bound(&w)["r1"], vec!["a"]);
    // The template changes; an updated replica r2 starts.
    let mut spec = w.get_model("m").unwrap().spec;
    spec.source = "file:///models/m-v2".into();
    w.put(Kind::Model, "m", BTreeMap::new(), json!(spec), serde_json::Value::Null);
    w.replica("r2", "m", 1, ReplicaPhase::Starting, Some(("n", vec![1])));
    w.replicas_mut("r2", |sp, _| {
        sp.source = "file:///models/m-v2".into();
        sp.engine_args = spec.engine_args.clone();
    });
    let mut s = state(&w, now);
    all_loaded(&w, &mut s);
    run(&mut w, &s);
    let b = bound(&w);
    assert_eq!((b["r1"].clone(), b["r2"].clone()), (vec!["a".to_string()], vec!["a".to_string()]), "kept and moved");
    // Pinned now counts on r2; r1's binding is an unpinned one, evictable as any other.
    let mut s = state(&w, now);
    all_loaded(&w, &mut s);
    run(&mut w, &s);
    let st = status(&w, "a");
    let pinned: Vec<(String, bool)> = st.replicas.iter().map(|r| (r.replica.to_string(), r.pinned)).collect();
    assert!(pinned.contains(&("r2".into(), true)) && pinned.contains(&("r1".into(), false)), "{pinned:?}");
    let mut s = state(&w, now);
    all_loaded(&w, &mut s);
    assert!(decide(&s).commands.is_empty(), "steady: one binding more, no churn");
}

#[test]
fn the_victim_is_taken_from_the_least_loaded_replica_then_least_recently_used() {
    // Two full one-slot replicas: a (on r1, idle longest) and b (on r2, used more recently).
    let world_of_two = || {
        let mut w = world(2, &["--max-cpu-loras", "1"]);
        for n in ["a", "b", "c"] {
            adapter(&mut w, n, json!("on-demand"));
        }
        w.replicas_mut("r1", |sp, _| sp.adapters = vec![AdapterBinding { name: name("a"), source: "sim://a".into() }]);
        w.replicas_mut("r2", |sp, _| sp.adapters = vec![AdapterBinding { name: name("b"), source: "sim://b".into() }]);
        w
    };
    let now = Instant::now();
    let setup = |w: &World, r1_busy: f64| {
        let mut s = state(w, now);
        for (n, r, ago) in [("a", "r1", 600), ("b", "r2", 60)] {
            s.bound_at.insert((name(n), name(r)), now - Duration::from_secs(900));
            s.last_used.insert((name(n), name(r)), now - Duration::from_secs(ago));
        }
        s.reports.insert(name("r1"), EngineReport { num_requests_running: r1_busy, ..Default::default() });
        s.reports.insert(name("r2"), EngineReport { num_requests_running: 0.0, ..Default::default() });
        s.demands.insert(name("c"), Demand { avoid: BTreeSet::new(), until: now + Duration::from_secs(30) });
        s
    };
    // r1 serves 6 requests (of other adapters sharing its engine, say), r2 none: c goes to
    // r2, evicting b although a has been idle longer, so c's traffic lands where there is room.
    let mut w = world_of_two();
    let s = setup(&w, 6.0);
    let plan = run(&mut w, &s);
    assert_eq!(plan.evictions, [(name("b"), name("r2"), name("c"))]);
    // Equally loaded: the least recently used goes, as before.
    let mut w = world_of_two();
    let s = setup(&w, 0.0);
    let plan = run(&mut w, &s);
    assert_eq!(plan.evictions, [(name("a"), name("r1"), name("c"))]);
}
