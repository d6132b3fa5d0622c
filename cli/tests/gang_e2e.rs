//! Multi-node replicas end to end: three servers, three agents with sim engines, a
//! gateway. A Model whose replica spans two nodes (`spec.topology`) is launched member by
//! member (the head reports its rendezvous, the worker joins it), serves through the
//! gateway from its head, and when the worker's node is lost the gang is replaced whole on
//! the nodes that are left, with no GPU bound twice.
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use common::*;
use flotilla_testkit::proc_fs;

const GANG: &str = "kind: Model\nmetadata:\n  name: big\nspec:\n  engine: sim\n  source: file:///models/big\n  \
                    gpus: 4\n  topology: {nodes: 2, gpus_per_node: 2}\n";

/// (replica name, phase, member nodes in rank order, rendezvous) of each replica of `big`.
async fn gangs(servers: &[String]) -> Vec<(String, String, Vec<String>, String)> {
    list_objects(servers, "replica", "model=big")
        .await
        .iter()
        .map(|o| {
            let spec: serde_json::Value = serde_json::from_str(&o.spec_json).unwrap_or_default();
            let status: serde_json::Value = serde_json::from_str(&o.status_json).unwrap_or_default();
            let members = spec["members"]
                .as_array()
                .map(|m| m.iter().filter_map(|x| x["node"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            let phase = status["phase"].as_str().unwrap_or("Pending").to_owned();
            (o.name.clone(), phase, members, status["rendezvous"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

async fn wait_gang(
    servers: &[String],
    secs: u64,
    what: &str,
    pred: impl Fn(&(String, String, Vec<String>, String)) -> bool,
) -> (String, String, Vec<String>, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let g = gangs(servers).await;
        if let Some(x) = g.iter().find(|x| pred(x)) {
            return x.clone();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {g:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn chat(gateway: &str) -> u16 {
    let body = r#"{"model":"big","messages":[{"role":"user","content":"hello"}],"max_tokens":4}"#;
    engine_call(gateway, "POST", "/v1/chat/completions", body, "").0
}

async fn served(gateway: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = 0;
    while Instant::now() < deadline {
        let g = gateway.to_owned();
        last = tokio::task::spawn_blocking(move || chat(&g)).await.unwrap();
        if last == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the gateway did not serve the gang within {secs} s (last status {last})");
}

/// PIDs of this test's engine processes that run as a gang's headless worker.
fn worker_engines(marker: u64) -> Vec<u32> {
    engine_pids(marker)
        .into_iter()
        .filter(|pid| proc_fs::cmdline(*pid).is_some_and(|c| String::from_utf8_lossy(&c).contains("--headless")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_gang_serves_from_its_head_and_is_replaced_whole_when_a_members_node_is_lost() {
    let mut fleet = Fleet::start(3, 2).await;
    let s = fleet.addrs.clone();
    apply(&s, GANG.into()).await;
    let (name, _, members, rendezvous) = wait_gang(&s, 90, "a Ready gang", |g| g.1 == "Ready").await;
    assert_eq!(members.len(), 2, "{members:?}");
    assert_ne!(members[0], members[1], "one member per node");
    assert!(rendezvous.starts_with("127.0.0.1:"), "the head's rendezvous is recorded: {rendezvous:?}");
    let workers = worker_engines(fleet.marker);
    assert_eq!(workers.len(), 1, "one headless worker runs: {workers:?}");

    let gateway = GatewayProc::start(&s.join(","), &[]);
    served(&gateway.addr, 30).await;

    // The worker's node is lost: its agent dies, and its engine with the machine.
    let lost = members[1].clone();
    let idx = fleet.agents.iter().position(|a| a.name == lost).expect("the worker's agent");
    let t0 = Instant::now();
    fleet.agents[idx].kill();
    for pid in workers {
        flotilla_testkit::procs::signal(pid, flotilla_testkit::procs::Signal::KILL);
    }
    let (renamed, _, moved, _) = wait_gang(&s, 120, "a new Ready gang off the lost node", |g| {
        g.1 == "Ready" && g.0 != name && !g.2.contains(&lost)
    })
    .await;
    eprintln!("gang replaced after its worker's node was lost in {:.1} s", t0.elapsed().as_secs_f64());
    let left: BTreeSet<&String> = fleet.agents.iter().map(|a| &a.name).filter(|n| **n != lost).collect();
    assert_eq!(moved.iter().collect::<BTreeSet<_>>(), left, "the new gang spans the two nodes left ({renamed})");
    // the old gang is gone once its head stopped, freeing its GPUs
    let deadline = Instant::now() + Duration::from_secs(60);
    while gangs(&s).await.iter().any(|g| g.0 == name) {
        assert!(Instant::now() < deadline, "the old gang was never deleted: {:#?}", gangs(&s).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    served(&gateway.addr, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_larger_than_the_cluster_stays_pending_with_its_reason() {
    let fleet = Fleet::start(1, 2).await;
    apply(&fleet.addrs, GANG.into()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = replicas(&fleet.addrs, "big").await;
        if let Some(x) = r.iter().find(|x| x.reason.contains("cannot be placed")) {
            assert_eq!(x.phase, "Pending");
            assert_eq!(x.reason, "a replica of 2 nodes cannot be placed: the cluster has 1 node");
            break;
        }
        assert!(Instant::now() < deadline, "no reason given: {r:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(worker_engines(fleet.marker).is_empty() && engine_pids(fleet.marker).is_empty(), "nothing runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_spread_over_too_few_racks_stays_pending_with_its_reason_until_a_rack_joins() {
    let dir = tempfile::tempdir().unwrap();
    let servers = start_three(dir.path());
    wait_voters(&servers[0].grpc, 3).await;
    let s: Vec<String> = servers.iter().map(|x| x.grpc.clone()).collect();
    let marker = marker();
    let agent = |i: usize, rack: &str| {
        let labels = format!("flotilla.io/rack={rack}");
        let data = dir.path().join(format!("agent-{i}"));
        AgentProc::start_with(&format!("node-{i}"), &data, &s.join(","), 1, marker, &[], &["--labels", &labels])
    };
    let mut agents = vec![agent(1, "r1"), agent(2, "r1")];
    wait_nodes_ready(&s, 2).await;
    let spread = GANG
        .replace("gpus: 4", "gpus: 2")
        .replace("{nodes: 2, gpus_per_node: 2}", "{nodes: 2, gpus_per_node: 1, placement: strict-spread}");
    apply(&s, spread).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = "strict-spread needs 2 nodes with 1 free GPU of one type in 2 different flotilla.io/rack domains: \
                they are in 1";
    loop {
        let r = replicas(&s, "big").await;
        if r.iter().any(|x| x.phase == "Pending" && x.reason == want) {
            break;
        }
        assert!(Instant::now() < deadline, "no strict-spread reason: {r:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(engine_pids(marker).is_empty(), "nothing starts while it is Pending");
    // a node in a second rack: the gang is placed across the two racks and runs
    agents.push(agent(3, "r2"));
    let (_, _, members, _) = wait_gang(&s, 90, "a Ready gang across racks", |g| g.1 == "Ready").await;
    assert!(members.contains(&"node-3".to_string()), "{members:?}");
    drop(agents);
    kill_engines(marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_members_node_moves_the_gang_whole_make_before_break() {
    use flotilla_api::pb::fleet_service_client::FleetServiceClient;
    use flotilla_api::pb::{ListNodesRequest, NodeAction, NodeActionRequest};
    let fleet = Fleet::start(4, 2).await;
    let s = fleet.addrs.clone();
    apply(&s, GANG.into()).await;
    let (old, _, members, _) = wait_gang(&s, 90, "a Ready gang", |g| g.1 == "Ready").await;
    let victim = members[1].clone();
    let leader = wait_voters(&s[0], 3).await;
    let leader_addr = fleet.servers.iter().find(|x| x.id == leader).unwrap().grpc.clone();
    let mut api = FleetServiceClient::new(channel(&leader_addr, Duration::from_secs(5)));
    api.set_node(NodeActionRequest { name: victim.clone(), action: NodeAction::Drain as i32 }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let g = gangs(&s).await;
        // make-before-break: some gang serves at every moment of the move
        assert!(g.iter().any(|x| x.1 == "Ready"), "no Ready gang during the drain: {g:#?}");
        let nodes = api.list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
        let state = nodes.iter().find(|n| n.name == victim).map(|n| n.state.clone()).unwrap_or_default();
        if state == "Drained" {
            assert!(g.iter().all(|x| x.0 != old), "the old gang is gone: {g:#?}");
            assert!(g.iter().all(|x| !x.2.contains(&victim)), "no member left on the drained node: {g:#?}");
            assert!(g.iter().any(|x| x.1 == "Ready"), "{g:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "node never drained: {state} {g:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
