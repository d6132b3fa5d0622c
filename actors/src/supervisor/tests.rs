//! Tables of the supervisor's routing: (what runs, input) -> the exact commands.
use std::collections::{BTreeMap, BTreeSet};

use flotilla_api::spec::{AdapterBinding, EngineKind, ReplicaSpec, ReplicaStatus};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::*;
use crate::adapters::Demand;
use crate::objects::key;
use crate::testkit::name;

fn object(kind: Kind, n: &str, labels: &[(&str, &str)], spec: Value, status: Value) -> StoredObject {
    StoredObject {
        key: key(kind, &name(n)),
        uid: format!("uid-{n}"),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        spec,
        status,
        revision: 7,
        create_revision: 3,
    }
}

fn model(n: &str, autoscaling: bool) -> StoredObject {
    let a = if autoscaling { json!({"strategy": "kpa"}) } else { Value::Null };
    object(Kind::Model, n, &[], json!({"replicas": 1, "autoscaling": a}), Value::Null)
}

fn node(n: &str) -> StoredObject {
    object(Kind::Node, n, &[], json!({"address": "127.0.0.1"}), Value::Null)
}

fn adapter(n: &str, base: Option<&str>) -> StoredObject {
    let spec = base.map_or(json!({}), |b| json!({"base_model": b, "source": "file:///a"}));
    object(Kind::Adapter, n, &[], spec, Value::Null)
}

/// A replica of `model` (by label), bound to `node`, holding `adapters`.
fn replica(n: &str, model: &str, node: Option<&str>, phase: ReplicaPhase, adapters: &[&str]) -> StoredObject {
    let spec = ReplicaSpec {
        kv_transfer: None,
        engine_image: Default::default(),
        topology: None,
        members: Vec::new(),
        model: name(model),
        engine: EngineKind::Sim,
        source: "file:///m".into(),
        engine_args: vec![],
        gpus_needed: 1,
        gpu_types: vec![],
        node: node.map(name),
        gpus: node.map(|_| vec![0]).unwrap_or_default(),
        adapters: adapters.iter().map(|a| AdapterBinding { name: name(a), source: "file:///a".into() }).collect(),
        template_hash: String::new(),
    };
    let status = ReplicaStatus { phase, ..ReplicaStatus::default() };
    object(Kind::Replica, n, &[(MODEL_LABEL, model)], json!(spec), json!(status))
}

fn view(o: &StoredObject) -> ReplicaView {
    ReplicaView::from_stored(o).expect("replica")
}

fn put(object: &StoredObject) -> WatchEvent {
    WatchEvent { revision: 9, event_type: EventType::Put, object: object.clone() }
}

fn del(object: &StoredObject) -> WatchEvent {
    WatchEvent { revision: 9, event_type: EventType::Delete, object: object.clone() }
}

fn running(children: &[Child]) -> HashSet<Child> {
    children.iter().cloned().collect()
}

fn m(s: &str) -> Child {
    Child::Model(name(s))
}
fn n(s: &str) -> Child {
    Child::Node(name(s))
}
fn ad(s: &str) -> Child {
    Child::Adapters(name(s))
}
fn au(s: &str) -> Child {
    Child::Autoscaler(name(s))
}

fn spawn(c: Child) -> Command {
    Command::Spawn(c, None)
}

#[test]
fn model_events() {
    use Command::{Adapters, Model};
    let (plain, scaled) = (model("m", false), model("m", true));
    let changed = || Model(name("m"), ModelMsg::Changed(None));
    // (case, running, event) -> commands
    let cases: Vec<(&str, Vec<Child>, WatchEvent, Vec<Command>)> = vec![
        ("new model starts its actor", vec![], put(&plain), vec![spawn(m("m"))]),
        ("new autoscaling model: autoscaler first", vec![], put(&scaled), vec![spawn(au("m")), spawn(m("m"))]),
        (
            "running: adapters and model told, autoscaler kept",
            vec![m("m"), au("m"), ad("m")],
            put(&scaled),
            vec![Adapters(name("m"), AdapterMsg::Changed), changed()],
        ),
        ("autoscaling turned on", vec![m("m")], put(&scaled), vec![spawn(au("m")), changed()]),
        ("another base's adapter controller is not told", vec![ad("k")], put(&plain), vec![spawn(m("m"))]),
        ("deleted, nothing runs: nothing", vec![], del(&scaled), vec![]),
        ("deleted: the model actor drains; no autoscaler", vec![m("m")], del(&scaled), vec![changed()]),
        (
            "deleted with adapters: their controller hears",
            vec![ad("m")],
            del(&plain),
            vec![Adapters(name("m"), AdapterMsg::Changed)],
        ),
    ];
    for (case, children, ev, want) in cases {
        assert_eq!(route(&running(&children), &ev), want, "{case}");
    }
}

#[test]
fn node_events() {
    use Command::{Node, Scheduler};
    let a = node("a");
    let nudge = || Scheduler(SchedulerMsg::Nudge);
    let cases: Vec<(&str, Vec<Child>, WatchEvent, Vec<Command>)> = vec![
        ("new node starts its actor", vec![], put(&a), vec![spawn(n("a"))]),
        ("new node nudges the scheduler", vec![Child::Scheduler], put(&a), vec![spawn(n("a")), nudge()]),
        (
            "running node re-reads itself",
            vec![n("a"), Child::Scheduler],
            put(&a),
            vec![Node(name("a"), NodeMsg::Changed(None)), nudge()],
        ),
        ("deleted, running: it sees it is gone", vec![n("a")], del(&a), vec![Node(name("a"), NodeMsg::Changed(None))]),
        ("deleted, not running: only the nudge", vec![Child::Scheduler], del(&a), vec![nudge()]),
        ("another node's actor is not told", vec![n("b")], put(&a), vec![spawn(n("a"))]),
    ];
    for (case, children, ev, want) in cases {
        assert_eq!(route(&running(&children), &ev), want, "{case}");
    }
}

#[test]
fn replica_events() {
    use Command::{Adapters, Assign, Model, Node, Scheduler};
    let ready = replica("m-1", "m", Some("a"), ReplicaPhase::Ready, &[]);
    let pending = replica("m-2", "m", None, ReplicaPhase::Pending, &[]);
    let failed = replica("m-3", "m", Some("b"), ReplicaPhase::Failed, &["lora"]);
    let bound = replica("m-4", "m", Some("a"), ReplicaPhase::Starting, &["lora"]);
    let mut relabelled = replica("x-1", "x", None, ReplicaPhase::Scheduled, &[]);
    relabelled.spec["model"] = json!("m");
    let mut malformed = replica("m-5", "m", None, ReplicaPhase::Pending, &[]);
    malformed.spec = json!({"gpus_needed": "many"});
    let assign = |o: &StoredObject| Assign(o.key.name.clone(), Some(Box::new(view(o))));
    let model_changed = |r: &str| Model(name("m"), ModelMsg::Changed(Some(name(r))));
    let node_changed = |nn: &str, r: &str| Node(name(nn), NodeMsg::Changed(Some(name(r))));
    let nudge = || Scheduler(SchedulerMsg::Nudge);
    let all = vec![m("m"), n("a"), n("b"), ad("m"), Child::Scheduler];
    let cases: Vec<(&str, Vec<Child>, WatchEvent, Vec<Command>)> = vec![
        (
            "ready: hub, model and node told; no nudge",
            all.clone(),
            put(&ready),
            vec![
                assign(&ready),
                Adapters(name("m"), AdapterMsg::Changed),
                model_changed("m-1"),
                node_changed("a", "m-1"),
            ],
        ),
        ("ready, nothing runs: the model actor starts", vec![], put(&ready), vec![assign(&ready), spawn(m("m"))]),
        (
            "pending: the scheduler is nudged",
            vec![m("m"), Child::Scheduler],
            put(&pending),
            vec![assign(&pending), model_changed("m-2"), nudge()],
        ),
        (
            "failed with adapters, node actor gone: adapters start, the node is not told",
            vec![m("m"), Child::Scheduler],
            put(&failed),
            vec![assign(&failed), spawn(ad("m")), model_changed("m-3"), nudge()],
        ),
        (
            "a binding starts the adapter controller",
            vec![m("m"), n("a")],
            put(&bound),
            vec![assign(&bound), spawn(ad("m")), model_changed("m-4"), node_changed("a", "m-4")],
        ),
        (
            "deleted: hub forgets it, model and node told, nudge",
            all.clone(),
            del(&ready),
            vec![
                Assign(name("m-1"), None),
                Adapters(name("m"), AdapterMsg::Changed),
                model_changed("m-1"),
                node_changed("a", "m-1"),
                nudge(),
            ],
        ),
        (
            "deleted, model actor gone: not restarted for it",
            vec![Child::Scheduler],
            del(&ready),
            vec![Assign(name("m-1"), None), nudge()],
        ),
        (
            "deleted with adapters: their controller starts to unbind",
            vec![],
            del(&bound),
            vec![Assign(name("m-4"), None), spawn(ad("m"))],
        ),
        (
            "the model label wins over the spec",
            vec![m("m")],
            put(&relabelled),
            vec![assign(&relabelled), spawn(m("x"))],
        ),
        ("malformed: ignored", all.clone(), put(&malformed), vec![]),
    ];
    for (case, children, ev, want) in cases {
        assert_eq!(route(&running(&children), &ev), want, "{case}");
    }
}

#[test]
fn adapter_and_tenant_events() {
    let changed = || Command::Adapters(name("m"), AdapterMsg::Changed);
    let a = adapter("lora", Some("m"));
    let orphan = adapter("lora", None);
    let tenant = object(Kind::Tenant, "t", &[], json!({}), Value::Null);
    let cases: Vec<(&str, Vec<Child>, WatchEvent, Vec<Command>)> = vec![
        ("new adapter starts its base's controller", vec![], put(&a), vec![spawn(ad("m"))]),
        ("running controller told", vec![ad("m")], put(&a), vec![changed()]),
        ("deleted, running: told", vec![ad("m")], del(&a), vec![changed()]),
        ("deleted, not running: nothing to unbind", vec![], del(&a), vec![]),
        ("no base model: nothing", vec![ad("m")], put(&orphan), vec![]),
        ("another base's controller is not told", vec![ad("k")], put(&a), vec![spawn(ad("m"))]),
        ("tenants concern no controller", vec![ad("m"), Child::Scheduler], put(&tenant), vec![]),
    ];
    for (case, children, ev, want) in cases {
        assert_eq!(route(&running(&children), &ev), want, "{case}");
    }
}

#[test]
fn messages() {
    let demand = Demand { avoid: BTreeSet::from([name("m-1")]), until: Instant::now() };
    let wants = |b: &str| Command::Adapters(name(b), AdapterMsg::Demand(name("lora"), demand.clone()));
    let ask = |b: &str| SupervisorMsg::Demand { base: name(b), adapter: name("lora"), demand: demand.clone() };
    // (case, running, message) -> commands
    let cases: Vec<(&str, Vec<Child>, SupervisorMsg, Vec<Command>)> = vec![
        (
            "heard: the node re-evaluates",
            vec![n("a")],
            SupervisorMsg::Heard(name("a")),
            vec![Command::Node(name("a"), NodeMsg::Heard)],
        ),
        ("heard, no node actor: nothing", vec![n("b")], SupervisorMsg::Heard(name("a")), vec![]),
        (
            "wake: the autoscaler decides now",
            vec![au("m")],
            SupervisorMsg::Wake(name("m")),
            vec![Command::Autoscaler(name("m"), AutoscalerMsg::Wake)],
        ),
        ("wake, model does not autoscale: nothing", vec![m("m")], SupervisorMsg::Wake(name("m")), vec![]),
        ("demand: the controller is told", vec![ad("m")], ask("m"), vec![wants("m")]),
        ("demand, not running: started, then told", vec![], ask("m"), vec![spawn(ad("m")), wants("m")]),
        ("respawn of a stopped child", vec![], SupervisorMsg::Respawn(m("m")), vec![spawn(m("m"))]),
        ("respawn of a child already rebuilt: nothing", vec![m("m")], SupervisorMsg::Respawn(m("m")), vec![]),
        ("respawn of the scheduler", vec![], SupervisorMsg::Respawn(Child::Scheduler), vec![spawn(Child::Scheduler)]),
        ("respawn of a node", vec![n("b")], SupervisorMsg::Respawn(n("a")), vec![spawn(n("a"))]),
        ("store changed: events are read, not routed here", vec![], SupervisorMsg::StoreChanged, vec![]),
    ];
    for (case, children, msg, want) in cases {
        assert_eq!(on_message(&running(&children), msg), want, "{case}");
    }
}

#[test]
fn sync_starts_what_is_missing_and_resyncs_what_runs() {
    let r1 = replica("m-1", "m", Some("a"), ReplicaPhase::Ready, &[]);
    let r2 = replica("m-2", "m", None, ReplicaPhase::Pending, &[]);
    let r3 = replica("k-1", "k", Some("b"), ReplicaPhase::Ready, &["lora"]);
    let snapshot = Snapshot {
        replicas: vec![view(&r1), view(&r2), view(&r3)],
        models: vec![model("m", true), model("z", false)],
        nodes: vec![node("a"), node("b"), node("c")],
        adapters: vec![adapter("q-lora", Some("q")), adapter("orphan", None)],
    };
    let got = sync(&running(&[n("b"), m("k"), ad("k"), au("z")]), &snapshot);
    let want = vec![
        Command::ResetHub(snapshot.replicas.clone()),
        spawn(au("m")),
        Command::Spawn(n("a"), Some(vec![view(&r1)])),
        Command::Node(name("b"), NodeMsg::Changed(None)),
        Command::Spawn(n("c"), Some(vec![])),
        Command::Model(name("k"), ModelMsg::Resync),
        Command::Spawn(m("m"), Some(vec![view(&r1), view(&r2)])),
        Command::Spawn(m("z"), Some(vec![])),
        Command::Adapters(name("k"), AdapterMsg::Changed),
        spawn(ad("q")),
        spawn(Child::Scheduler),
        Command::Scheduler(SchedulerMsg::Nudge),
    ];
    assert_eq!(got, want);

    let all = running(&[n("a"), n("b"), n("c"), m("k"), m("m"), m("z"), ad("k"), ad("q"), au("m"), Child::Scheduler]);
    let again = sync(&all, &snapshot);
    let want = vec![
        Command::ResetHub(snapshot.replicas.clone()),
        Command::Node(name("a"), NodeMsg::Changed(None)),
        Command::Node(name("b"), NodeMsg::Changed(None)),
        Command::Node(name("c"), NodeMsg::Changed(None)),
        Command::Model(name("k"), ModelMsg::Resync),
        Command::Model(name("m"), ModelMsg::Resync),
        Command::Model(name("z"), ModelMsg::Resync),
        Command::Adapters(name("k"), AdapterMsg::Changed),
        Command::Adapters(name("q"), AdapterMsg::Changed),
        Command::Scheduler(SchedulerMsg::Nudge),
    ];
    assert_eq!(again, want, "everything runs: only resyncs");

    let empty = sync(&running(&[]), &Snapshot::default());
    assert_eq!(
        empty,
        vec![Command::ResetHub(vec![]), spawn(Child::Scheduler), Command::Scheduler(SchedulerMsg::Nudge)]
    );
}

#[test]
fn helpers_read_the_base_and_the_model() {
    assert_eq!(base_of(&adapter("lora", Some("m"))), Some(name("m")));
    assert_eq!(base_of(&adapter("lora", None)), None);
    let mut bad = adapter("lora", None);
    bad.spec = json!({"base_model": "Not A Name!"});
    assert_eq!(base_of(&bad), None);
    let mut r = view(&replica("x-1", "x", None, ReplicaPhase::Pending, &[]));
    assert_eq!(model_of(&r), name("x"), "the label");
    r.labels = BTreeMap::new();
    assert_eq!(model_of(&r), name("x"), "the spec without a label");
    r.labels.insert(MODEL_LABEL.into(), "Bad!".into());
    assert_eq!(model_of(&r), name("x"), "an unparsable label falls back to the spec");
}
