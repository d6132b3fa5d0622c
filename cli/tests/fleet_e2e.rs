//! Models actually run: 3 servers and 2 agents as real processes on loopback. Replicas are
//! placed, engines start and answer, scale up and down, and the fleet heals when an agent,
//! an engine or the leader dies.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use common::*;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{DeleteRequest, WatchRequest};
use flotilla_testkit::manifests::model_manifest;
use futures::StreamExt;

fn no_gpu_bound_twice(r: &[ReplicaView]) {
    let mut seen = BTreeSet::new();
    for x in r.iter().filter(|x| x.node.is_some()) {
        for g in &x.gpus {
            assert!(seen.insert((x.node.clone(), *g)), "GPU {g} on {:?} bound twice: {r:#?}", x.node);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_run_scale_and_stop_on_delete() {
    let fleet = Fleet::start(2, 4).await;
    let s = &fleet.addrs;
    apply(s, model_manifest("chat", 3, 1)).await;
    let r = wait_replicas(s, "chat", 60, "3 ready replicas", |r| r.len() == 3 && ready(r) == 3).await;
    no_gpu_bound_twice(&r);
    let keys = engine_keys(s).await;
    for x in &r {
        let key = keys.get(&x.name).map(String::as_str).unwrap_or_default();
        assert!(chat_ok(x.endpoint.as_deref().unwrap(), "chat", key), "replica {} does not answer", x.name);
    }
    assert_eq!(engine_pids(fleet.marker).len(), 3);

    apply(s, model_manifest("chat", 5, 1)).await;
    let r = wait_replicas(s, "chat", 60, "5 ready replicas", |r| r.len() == 5 && ready(r) == 5).await;
    no_gpu_bound_twice(&r);
    apply(s, model_manifest("chat", 1, 1)).await;
    wait_replicas(s, "chat", 60, "1 replica", |r| r.len() == 1 && ready(r) == 1).await;
    wait_engines(fleet.marker, 1).await;

    let mut c = ObjectServiceClient::new(channel(&s[0], Duration::from_secs(5)));
    c.delete(DeleteRequest { kind: "model".into(), name: "chat".into(), expected_revision: None }).await.unwrap();
    wait_replicas(s, "chat", 60, "no replicas", |r| r.is_empty()).await;
    wait_engines(fleet.marker, 0).await;
}

async fn wait_engines(marker: u64, n: usize) {
    for _ in 0..300 {
        if engine_pids(marker).len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("expected {n} engine processes, found {}", engine_pids(marker).len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_replicas_are_rescheduled_on_the_other_node() {
    let mut fleet = Fleet::start(2, 4).await;
    let s = fleet.addrs.clone();
    apply(&s, model_manifest("resched", 4, 1)).await;
    let r = wait_replicas(&s, "resched", 60, "4 ready", |r| r.len() == 4 && ready(r) == 4).await;
    // Kill the node hosting the most replicas (bin-packing may put all 4 on one).
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for x in &r {
        *per_node.entry(x.node.clone().unwrap()).or_default() += 1;
    }
    let (victim, _) = per_node.iter().max_by_key(|(_, n)| **n).unwrap();
    let idx = fleet.agents.iter().position(|a| &a.name == victim).unwrap();
    let killed_at = Instant::now();
    fleet.agents[idx].kill();
    // Its engines die with the machine in real life; here they are orphans of a dead agent.
    let survivor = fleet.agents[1 - idx].name.clone();
    let r = wait_replicas(&s, "resched", 90, "4 ready on the survivor", |r| {
        r.iter().filter(|x| x.phase == "Ready" && x.node.as_deref() == Some(survivor.as_str())).count() == 4
    })
    .await;
    no_gpu_bound_twice(&r);
    eprintln!("replicas rescheduled after node loss in {:.1} s", killed_at.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_scale_up_converges_without_double_binding() {
    let mut fleet = Fleet::start(2, 4).await;
    let s = fleet.addrs.clone();
    // Record every state of every replica the watch stream shows.
    let mut watch = ObjectServiceClient::new(channel(&s[1], Duration::from_secs(120)))
        .watch(WatchRequest { kind: "Replica".into(), after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let recorder = tokio::spawn(async move {
        let mut current: BTreeMap<String, ReplicaView> = BTreeMap::new();
        let mut violations = Vec::new();
        while let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_secs(20), watch.next()).await {
            let view = replica_view(ev.object.as_ref().unwrap());
            if ev.r#type == 1 {
                current.remove(&view.name);
            } else {
                current.insert(view.name.clone(), view);
            }
            let mut seen = BTreeSet::new();
            for x in current.values().filter(|x| x.node.is_some()) {
                for g in &x.gpus {
                    if !seen.insert((x.node.clone(), *g)) {
                        violations.push(format!("rev {}: GPU {g} on {:?} bound twice", ev.revision, x.node));
                    }
                }
            }
        }
        violations
    });
    apply(&s, model_manifest("grow", 2, 1)).await;
    wait_replicas(&s, "grow", 60, "2 ready", |r| ready(r) == 2).await;
    apply(&s, model_manifest("grow", 7, 1)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leader = wait_voters(&s[0], 3).await;
    let li = fleet.servers.iter().position(|x| x.id == leader).unwrap();
    fleet.servers[li].kill();
    let live: Vec<String> = fleet.servers.iter().filter(|x| x.is_running()).map(|x| x.grpc.clone()).collect();
    let r = wait_replicas(&live, "grow", 90, "exactly 7 ready", |r| r.len() == 7 && ready(r) == 7).await;
    no_gpu_bound_twice(&r);
    wait_engines(fleet.marker, 7).await;
    let violations = recorder.await.unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
    drop(fleet.agents.drain(..));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_engine_is_restarted_and_crash_loops_fail_with_a_reason() {
    let fleet = Fleet::start(1, 2).await;
    let s = &fleet.addrs;
    apply(s, model_manifest("crashy", 1, 1)).await;
    let r = wait_replicas(s, "crashy", 60, "ready", |r| ready(r) == 1).await;
    let endpoint = r[0].endpoint.clone().unwrap();
    crash(&endpoint);
    let r = wait_replicas(s, "crashy", 60, "restarted and ready", |r| ready(r) == 1 && r[0].restarts >= 1).await;
    assert_eq!(r[0].name, r[0].name);
    // Crash it every time it comes back until the agent gives up.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = replicas(s, "crashy").await;
        if r.iter().any(|x| x.phase == "Failed") {
            let failed = r.iter().find(|x| x.phase == "Failed").unwrap();
            assert!(!failed.reason.is_empty(), "Failed without a reason: {failed:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never reached Failed: {r:#?}");
        for x in r.iter().filter(|x| x.phase == "Ready") {
            if let Some(e) = &x.endpoint {
                crash(e);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn crash(endpoint: &str) {
    let body = r#"{"crash": true}"#;
    let _ = raw_http::send_blocking(endpoint, "POST", "/sim/faults", body, Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplaceable_model_stays_pending_with_a_reason_and_duplicate_agent_is_refused() {
    let fleet = Fleet::start(1, 2).await;
    let s = &fleet.addrs;
    apply(s, model_manifest("huge", 1, 8)).await;
    let r = wait_replicas(s, "huge", 30, "a pending replica with a reason", |r| {
        r.len() == 1 && r[0].phase == "Pending" && r[0].reason.to_lowercase().contains("gpu")
    })
    .await;
    assert!(r[0].node.is_none());

    // A second agent claiming node-1's name is refused and exits with a clear error.
    let dir = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(BIN)
        .args(["agent", "--server", &s.join(","), "--node-name", "node-1", "--gpus", "1", "--gpu-type", "A100-80GB"])
        .arg("--data-dir")
        .arg(dir.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run).await.expect("duplicate agent exits").unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node-1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_node_is_empty_before_it_is_marked_drained() {
    use flotilla_api::pb::fleet_service_client::FleetServiceClient;
    use flotilla_api::pb::{ListNodesRequest, NodeAction, NodeActionRequest};
    let fleet = Fleet::start(2, 4).await;
    let s = &fleet.addrs;
    apply(s, model_manifest("movable", 2, 1)).await;
    let r = wait_replicas(s, "movable", 60, "2 ready", |r| ready(r) == 2).await;
    let victim = r[0].node.clone().unwrap();
    let leader = wait_voters(&s[0], 3).await;
    let leader_addr = fleet.servers.iter().find(|x| x.id == leader).unwrap().grpc.clone();
    let mut fleet_api = FleetServiceClient::new(channel(&leader_addr, Duration::from_secs(5)));
    fleet_api.set_node(NodeActionRequest { name: victim.clone(), action: NodeAction::Drain as i32 }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let nodes = fleet_api.list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
        let state = nodes.iter().find(|n| n.name == victim).map(|n| n.state.clone()).unwrap_or_default();
        let r = replicas(s, "movable").await;
        if state == "Drained" {
            assert!(
                r.iter().all(|x| x.node.as_deref() != Some(victim.as_str())),
                "drained node still hosts replicas: {r:#?}"
            );
            assert_eq!(ready(&r), 2, "replicas are not all ready elsewhere: {r:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "node never drained: {state} {r:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
