//! In-process integration tests: real servers (Raft, sled, gRPC on loopback) running the
//! controllers, and fake agents speaking the AgentService protocol.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use common::*;
use flotilla_api::pb::fleet_service_client::FleetServiceClient;
use flotilla_api::pb::{ListNodesRequest, NodeAction, NodeActionRequest, WatchEndpointsRequest};

const LONG: Duration = Duration::from_secs(30);

async fn node_allocations(c: &Cluster) -> BTreeMap<String, usize> {
    c.list("Node")
        .await
        .into_iter()
        .map(|o| (o.name, json(&o.status_json)["allocations"].as_object().map_or(0, |m| m.len())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_scales_up_down_and_deletes_with_gpus_freed() {
    let c = Cluster::start(1).await;
    c.leader().await;
    let _a = FakeAgent::start(c.live_addrs(), "node-a", 4);
    let _b = FakeAgent::start(c.live_addrs(), "node-b", 4);
    wait_until("two nodes", LONG, || async { c.list("Node").await.len() == 2 }).await;

    c.apply(&model_manifest("llama", 3, 1)).await;
    wait_until("3 ready replicas", LONG, || async { ready_count(&c).await == 3 }).await;
    let nodes: BTreeSet<String> = replicas(&c).await.values().map(|(_, n)| n.clone()).collect();
    assert_eq!(nodes.len(), 1, "bin-packed onto one node: {nodes:?}");
    wait_until("model status ready 3/3", LONG, || async {
        let m = c.get("Model", "llama").await.expect("model");
        let s = json(&m.status_json);
        s["ready_replicas"] == 3 && s["desired_replicas"] == 3 && s["conditions"][0]["status"] == "True"
    })
    .await;
    for r in replicas(&c).await.keys() {
        assert!(r.starts_with("llama-") && r.len() == "llama-".len() + 5, "{r}");
    }

    // Endpoints for the gateway, and the node list for operators.
    let mut fleet = FleetServiceClient::new(channel(c.live_addrs()[0]));
    let mut watch =
        fleet.watch_endpoints(WatchEndpointsRequest { model: "llama".into() }).await.expect("watch").into_inner();
    let set = watch.message().await.expect("stream").expect("a snapshot");
    assert_eq!(set.endpoints.len(), 3);
    assert!(set.endpoints.iter().all(|e| e.gpu_type == "H100-80GB" && e.address.starts_with("127.0.0.1:")));
    let nodes = fleet.list_nodes(ListNodesRequest {}).await.expect("list").into_inner().nodes;
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes.iter().map(|n| n.gpus_free).sum::<u32>(), 5);
    assert!(nodes.iter().all(|n| n.state == "Ready" && n.heartbeat_age_ms > 0 && n.heartbeat_age_ms < 1_000));

    c.apply(&model_manifest("llama", 5, 1)).await;
    wait_until("5 ready replicas", LONG, || async { ready_count(&c).await == 5 }).await;
    assert_eq!(node_allocations(&c).await.values().sum::<usize>(), 5);

    c.apply(&model_manifest("llama", 1, 1)).await;
    wait_until("1 replica left", LONG, || async { replicas(&c).await.len() == 1 && ready_count(&c).await == 1 }).await;
    wait_until("4 GPUs freed", LONG, || async { node_allocations(&c).await.values().sum::<usize>() == 1 }).await;

    c.delete("Model", "llama").await;
    wait_until("no replicas", LONG, || async { replicas(&c).await.is_empty() }).await;
    wait_until("all GPUs free", LONG, || async { node_allocations(&c).await.values().sum::<usize>() == 0 }).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_model_stays_pending_with_a_reason_naming_gpus() {
    let c = Cluster::start(1).await;
    let leader = c.leader().await;
    let _a = FakeAgent::start(c.live_addrs(), "node-a", 4);
    wait_until("node", LONG, || async { c.list("Node").await.len() == 1 }).await;
    c.apply(&model_manifest("huge", 1, 8)).await;
    wait_until("reason on the model", LONG, || async {
        let Some(m) = c.get("Model", "huge").await else { return false };
        let s = json(&m.status_json);
        s["ready_replicas"] == 0
            && s["conditions"][0]["message"] == "1 replica(s) pending: no node has 8 free GPUs: 1 has 4 free"
    })
    .await;
    let r = replicas(&c).await;
    assert_eq!(r.values().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), vec!["Pending"]);

    // The leader's /metrics says the same, in numbers, and Prometheus reads it.
    let http = c.handle(leader).http_addr.to_string();
    let scrape = || async { flotilla_testkit::raw_http::http_get(&http, "/metrics").await.expect("scrape").1 };
    let has = |text: &str, line: &str| text.lines().any(|l| l == line);
    c.apply(&model_manifest("small", 1, 1)).await;
    wait_until("small placed", LONG, || async { ready_count(&c).await == 1 }).await;
    let text = scrape().await;
    for line in [
        "flotilla_controller_leading 1",
        r#"flotilla_controller_pending_replicas{reason="insufficient_gpus"} 1"#,
        r#"flotilla_controller_pending_replicas{reason="no_nodes"} 0"#,
        "flotilla_controller_bindings_total 1",
        "flotilla_controller_placement_duration_seconds_count 1",
        r#"flotilla_controller_nodes{state="Ready"} 1"#,
        r#"flotilla_controller_replicas{phase="Pending"} 1"#,
        r#"flotilla_controller_replicas{phase="Ready"} 1"#,
        r#"flotilla_controller_gpus{state="allocated"} 1"#,
        r#"flotilla_controller_gpus{state="free"} 3"#,
    ] {
        assert!(has(&text, line), "no line {line:?} in\n{text}");
    }
    let counted = |prefix: &str| {
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert!(counted(r#"flotilla_controller_reconciles_total{controller="model"}"#) >= Some(2));
    assert!(counted(r#"flotilla_controller_proposals_total{controller="scheduler",result="applied"}"#) >= Some(1));
    assert!(counted("flotilla_controller_heartbeats_total") >= Some(1));
    let (code, out) = flotilla_testkit::promtool::check_metrics(&text);
    assert_eq!(code, 0, "promtool check metrics:\n{out}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reporting_an_engine_on_another_host_is_refused_and_never_routed_to() {
    let c = Cluster::start(1).await;
    c.leader().await;
    // Connected from 127.0.0.1, it reports its engines at 10.1.2.3.
    let liar = FakeAgent::start_reporting(c.live_addrs(), "node-liar", "agent-liar", 1, "10.1.2.3");
    let _honest = FakeAgent::start(c.live_addrs(), "node-honest", 1);
    wait_until("two nodes", LONG, || async { c.list("Node").await.len() == 2 }).await;
    c.apply(&model_manifest("llama", 2, 1)).await;

    wait_until("the lie refused", LONG, || async { !liar.errors.lock().expect("lock").is_empty() }).await;
    let e = liar.errors.lock().expect("lock")[0].clone();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("heartbeat.engines[0].endpoint: host 10.1.2.3 is not this agent's address 127.0.0.1"),
        "{}",
        e.message()
    );
    wait_until("the honest replica ready", LONG, || async { ready_count(&c).await == 1 }).await;
    let mut fleet = FleetServiceClient::new(channel(c.live_addrs()[0]));
    let mut watch =
        fleet.watch_endpoints(WatchEndpointsRequest { model: String::new() }).await.expect("watch").into_inner();
    let set = watch.message().await.expect("stream").expect("a snapshot");
    let addresses: Vec<&str> = set.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addresses, ["127.0.0.1:20000"], "only the honest agent's engine is routed to");
    for o in c.list("Replica").await {
        assert!(!o.status_json.contains("10.1.2.3"), "the lie was written: {}", o.status_json);
    }

    // A registration with privileged engine ports is refused before anything is written.
    let mut client = flotilla_api::pb::agent_service_client::AgentServiceClient::new(channel(c.live_addrs()[0]));
    let reg = flotilla_api::pb::Register {
        node_name: "node-ports".into(),
        agent_id: "agent-ports".into(),
        address: "127.0.0.1".into(),
        engine_ports: Some(flotilla_api::pb::PortRange { low: 1, high: 65535 }),
        ..Default::default()
    };
    let first = flotilla_api::pb::AgentMessage { msg: Some(flotilla_api::pb::agent_message::Msg::Register(reg)) };
    let e = client.session(tokio_stream::iter([first])).await.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("register.engine_ports: 1-65535"), "{}", e.message());
    assert!(c.get("Node", "node-ports").await.is_none(), "nothing written");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_agent_name_is_refused_while_the_first_lives() {
    let c = Cluster::start(1).await;
    c.leader().await;
    let first = FakeAgent::start(c.live_addrs(), "node-a", 2);
    wait_until("node", LONG, || async { c.list("Node").await.len() == 1 }).await;
    let second = FakeAgent::start_as(c.live_addrs(), "node-a", "impostor", 2);
    wait_until("refusal", LONG, || async { !second.errors.lock().expect("lock").is_empty() }).await;
    let e = second.errors.lock().expect("lock")[0].clone();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    assert!(e.message().contains("node name node-a is held by agent agent-node-a, last seen"), "{}", e.message());
    let spec = json(&c.get("Node", "node-a").await.expect("node").spec_json);
    assert_eq!(spec["agent_id"], "agent-node-a");
    // Once the first is gone past the TTL, the name may be taken over.
    first.kill();
    wait_until("takeover", LONG, || async {
        json(&c.get("Node", "node-a").await.expect("node").spec_json)["agent_id"] == "impostor"
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_node_replicas_are_rescheduled_after_ttl_and_grace() {
    let c = Cluster::start(1).await;
    c.leader().await;
    let a = FakeAgent::start(c.live_addrs(), "node-a", 4);
    wait_until("node a", LONG, || async { c.list("Node").await.len() == 1 }).await;
    c.apply(&model_manifest("m", 2, 1)).await;
    wait_until("2 ready on a", LONG, || async { ready_count(&c).await == 2 }).await;
    let _b = FakeAgent::start(c.live_addrs(), "node-b", 4);
    wait_until("node b", LONG, || async { c.list("Node").await.len() == 2 }).await;
    let killed = Instant::now();
    a.kill();
    wait_until("node a NotReady", LONG, || async {
        json(&c.get("Node", "node-a").await.expect("node").status_json)["state"] == "NotReady"
    })
    .await;
    wait_until("2 ready on b", LONG, || async {
        let r = replicas(&c).await;
        r.len() == 2 && r.values().all(|(p, n)| p == "Ready" && n == "node-b")
    })
    .await;
    let took = killed.elapsed();
    let cfg = actors_config();
    assert!(took >= Duration::from_millis(cfg.node_ttl_ms + cfg.reschedule_grace_ms - 200), "{took:?}");
    eprintln!("rescheduled after {took:?} (ttl {} ms + grace {} ms)", cfg.node_ttl_ms, cfg.reschedule_grace_ms);
    assert_eq!(node_allocations(&c).await.get("node-a"), Some(&0));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_replicas_off_before_the_node_is_drained() {
    let c = Cluster::start(1).await;
    c.leader().await;
    let _a = FakeAgent::start(c.live_addrs(), "node-a", 4);
    wait_until("node a", LONG, || async { c.list("Node").await.len() == 1 }).await;
    c.apply(&model_manifest("m", 2, 1)).await;
    wait_until("2 ready", LONG, || async { ready_count(&c).await == 2 }).await;
    let _b = FakeAgent::start(c.live_addrs(), "node-b", 4);
    wait_until("node b", LONG, || async { c.list("Node").await.len() == 2 }).await;
    let mut fleet = FleetServiceClient::new(channel(c.live_addrs()[0]));
    let r = fleet
        .set_node(NodeActionRequest { name: "node-a".into(), action: NodeAction::Drain as i32 })
        .await
        .expect("drain");
    assert_eq!(r.into_inner().node.expect("node").state, "Draining");
    wait_until("drained", LONG, || async {
        json(&c.get("Node", "node-a").await.expect("node").status_json)["state"] == "Drained"
    })
    .await;
    let r = replicas(&c).await;
    assert!(r.len() == 2 && r.values().all(|(p, n)| p == "Ready" && n == "node-b"), "{r:?}");
    let e = fleet.set_node(NodeActionRequest { name: "nope".into(), action: 0 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    c.shutdown().await;
}

/// A model whose stored inputs do not change is not decided again on every tick (a leader
/// with thousands of idle Models spent most of a core on it), and it still reacts to its
/// node draining (which no event announces to it: the tick sees the node's revision move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_model_is_not_decided_again_every_tick_but_a_drain_still_moves_it() {
    use flotilla_actors::metrics::Controller;
    let c = Cluster::start(1).await;
    let leader = c.leader().await;
    let _a = FakeAgent::start(c.live_addrs(), "node-a", 4);
    wait_until("node-a", LONG, || async { c.list("Node").await.len() == 1 }).await;
    c.apply(&model_manifest("llama", 1, 1)).await;
    wait_until("1 ready replica", LONG, || async { ready_count(&c).await == 1 }).await;
    let ctx = c.ctx(leader).expect("the leader's controllers");
    let decisions = || ctx.metrics.reconciles(Controller::Model);
    // settled: its status written, then quiet
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = decisions();
    tokio::time::sleep(Duration::from_millis(1_500)).await; // 15 ticks of 100 ms
    let during = decisions() - before;
    assert!(during <= 3, "{during} decisions in 15 ticks of an idle model");

    let _b = FakeAgent::start(c.live_addrs(), "node-b", 4);
    wait_until("node-b", LONG, || async { c.list("Node").await.len() == 2 }).await;
    let mut fleet = FleetServiceClient::new(channel(c.live_addrs()[0]));
    fleet
        .set_node(NodeActionRequest { name: "node-a".into(), action: NodeAction::Drain as i32 })
        .await
        .expect("drain node-a");
    wait_until("the replica moved to node-b", LONG, || async {
        let r = replicas(&c).await;
        ready_count(&c).await == 1 && r.values().any(|(phase, node)| phase == "Ready" && node == "node-b")
    })
    .await;
    c.shutdown().await;
}
