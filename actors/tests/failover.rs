//! Leader failover in a 3-server in-process cluster in the middle of a scale-up: the new
//! leader's controllers converge to exactly the desired count, and no state the watch
//! stream shows ever has a GPU claimed by two live replicas.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flotilla_api::pb::WatchRequest;

/// Follows every change from `after` and checks, after each event, that no (node, GPU)
/// is claimed by two replicas that are not Failed, and that node allocations agree.
fn watch_invariant(c: &Cluster, via: usize, violations: Arc<Mutex<Vec<String>>>, seen: Arc<Mutex<u64>>) {
    let addr = c.addr(via as u64 + 1);
    tokio::spawn(async move {
        let mut client = flotilla_api::pb::object_service_client::ObjectServiceClient::new(channel(addr));
        let mut after = 0;
        let mut replicas: HashMap<String, (String, Vec<u64>, String)> = HashMap::new();
        let mut nodes: HashMap<String, BTreeMap<String, String>> = HashMap::new();
        loop {
            let Ok(resp) = client.watch(WatchRequest { kind: String::new(), after_revision: after }).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut stream = resp.into_inner();
            while let Ok(Some(ev)) = stream.message().await {
                after = ev.revision;
                let Some(o) = ev.object else { continue };
                let deleted = ev.r#type == 1;
                match o.kind.as_str() {
                    "Replica" => {
                        if deleted {
                            replicas.remove(&o.name);
                        } else {
                            let spec = json(&o.spec_json);
                            let phase = json(&o.status_json)["phase"].as_str().unwrap_or("Pending").to_owned();
                            let gpus = spec["gpus"]
                                .as_array()
                                .map(|a| a.iter().filter_map(|g| g.as_u64()).collect())
                                .unwrap_or_default();
                            replicas
                                .insert(o.name.clone(), (spec["node"].as_str().unwrap_or("").to_owned(), gpus, phase));
                        }
                    }
                    "Node" => {
                        let alloc = json(&o.status_json)["allocations"]
                            .as_object()
                            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned())).collect())
                            .unwrap_or_default();
                        nodes.insert(o.name.clone(), alloc);
                    }
                    _ => {}
                }
                let mut claims: HashMap<(String, u64), String> = HashMap::new();
                for (name, (node, gpus, phase)) in &replicas {
                    if node.is_empty() || phase == "Failed" {
                        continue;
                    }
                    for g in gpus {
                        if let Some(other) = claims.insert((node.clone(), *g), name.clone()) {
                            violations
                                .lock()
                                .expect("lock")
                                .push(format!("rev {after}: gpu {g} of {node} claimed by {name} and {other}"));
                        }
                    }
                }
                for (node, alloc) in &nodes {
                    for (g, r) in alloc {
                        if let Some((n, gpus, _)) = replicas.get(r) {
                            if n != node || !gpus.iter().any(|x| x.to_string() == *g) {
                                violations
                                    .lock()
                                    .expect("lock")
                                    .push(format!("rev {after}: {node} gpu {g} allocated to {r} bound elsewhere"));
                            }
                        }
                    }
                }
                *seen.lock().expect("lock") = after;
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_mid_scale_up_converges_without_double_binding() {
    let mut c = Cluster::start(3).await;
    let leader = c.leader().await;
    let _a = FakeAgent::start(c.live_addrs(), "node-a", 4);
    let _b = FakeAgent::start(c.live_addrs(), "node-b", 4);
    wait_until("two nodes", Duration::from_secs(30), || async { c.list("Node").await.len() == 2 }).await;
    let violations = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(0));
    let survivor = (1..=3).find(|i| *i != leader).expect("a follower") as usize - 1;
    watch_invariant(&c, survivor, violations.clone(), seen.clone());

    c.apply(&model_manifest("m", 2, 1)).await;
    wait_until("2 ready", Duration::from_secs(30), || async { ready_count(&c).await == 2 }).await;
    c.apply(&model_manifest("m", 7, 1)).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let t = tokio::time::Instant::now();
    c.stop(leader).await;
    eprintln!("old leader stopped after {:?}", t.elapsed());
    let new_leader = c.leader().await;
    eprintln!("new leader {new_leader} running controllers after {:?}", t.elapsed());
    assert_ne!(new_leader, leader);
    wait_until("exactly 7 ready replicas", Duration::from_secs(60), || async {
        let r = replicas(&c).await;
        r.len() == 7 && r.values().all(|(p, _)| p == "Ready")
    })
    .await;
    eprintln!("converged to 7 ready after {:?}", t.elapsed());
    // Still exactly 7 a while later (no late duplicate creations).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(replicas(&c).await.len(), 7);
    let allocated: usize = c
        .list("Node")
        .await
        .iter()
        .map(|o| json(&o.status_json)["allocations"].as_object().map_or(0, |m| m.len()))
        .sum();
    assert_eq!(allocated, 7);
    assert!(*seen.lock().expect("lock") > 0, "the watch saw events");
    let v = violations.lock().expect("lock").clone();
    assert!(v.is_empty(), "{v:?}");
    c.shutdown().await;
}
