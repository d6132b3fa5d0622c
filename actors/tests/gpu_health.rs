//! GPU health through real servers: a fake agent's heartbeats report a GPU Failed (xid 79)
//! or Degraded (throttling) with evidence; the leader records it in the Node status, moves
//! the replica off the Failed GPU make-before-break, places nothing new on either, and
//! places again once the agent reports the GPUs healthy.
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use flotilla_api::pb::GpuInfo;

const LONG: Duration = Duration::from_secs(30);

fn report(n: u32, unwell: &[(u32, &str, &str)]) -> Vec<GpuInfo> {
    (0..n)
        .map(|index| {
            let (state, evidence) = unwell
                .iter()
                .find(|(i, _, _)| *i == index)
                .map_or(("healthy", vec![]), |(_, s, e)| (*s, vec![e.to_string()]));
            GpuInfo {
                index,
                gpu_type: "H100-80GB".into(),
                memory_mib: 81_920,
                healthy: state != "failed",
                state: state.into(),
                evidence,
                ..Default::default()
            }
        })
        .collect()
}

/// (name, phase, gpus) of every replica.
async fn replicas_gpus(c: &Cluster) -> Vec<(String, String, Vec<u64>)> {
    c.list("Replica")
        .await
        .into_iter()
        .map(|o| {
            let spec = json(&o.spec_json);
            let phase = json(&o.status_json)["phase"].as_str().unwrap_or("Pending").to_owned();
            let gpus =
                spec["gpus"].as_array().map(|a| a.iter().filter_map(|g| g.as_u64()).collect()).unwrap_or_default();
            (o.name, phase, gpus)
        })
        .collect()
}

async fn node_status(c: &Cluster) -> serde_json::Value {
    json(&c.get("Node", "node-a").await.expect("node").status_json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_gpu_is_recorded_and_its_replica_moves_make_before_break_and_a_degraded_one_takes_nothing_new() {
    let c = Cluster::start(1).await;
    c.leader().await;
    let agent = FakeAgent::start(c.live_addrs(), "node-a", 4);
    *agent.gpus.lock().unwrap() = report(4, &[]);
    wait_until("node a", LONG, || async { c.list("Node").await.len() == 1 }).await;
    c.apply(&model_manifest("m", 1, 1)).await;
    wait_until("1 ready", LONG, || async { ready_count(&c).await == 1 }).await;
    let first = replicas_gpus(&c).await;
    let (old, _, old_gpus) = first[0].clone();
    let bad = old_gpus[0] as u32;

    let xid = "xid 79 (fallen off the bus) at 20:31:07";
    *agent.gpus.lock().unwrap() = report(4, &[(bad, "failed", xid)]);
    wait_until("gpu recorded Failed", LONG, || async {
        let st = node_status(&c).await;
        st["gpu_health"][bad.to_string()]["state"] == "Failed"
    })
    .await;
    let st = node_status(&c).await;
    assert_eq!(st["gpu_health"][bad.to_string()]["evidence"][0], xid, "{st}");
    assert!(st["gpu_health"][bad.to_string()]["since_ms"].as_u64().unwrap() > 0);
    assert_eq!(st["unhealthy_gpus"], serde_json::json!([bad]));

    // Make-before-break: whenever the old replica is seen leaving, its replacement is Ready.
    let deadline = tokio::time::Instant::now() + LONG;
    let replacement = loop {
        let r = replicas_gpus(&c).await;
        let old_phase = r.iter().find(|(n, _, _)| *n == old).map(|(_, p, _)| p.clone());
        let ready_new: Vec<_> = r.iter().filter(|(n, p, _)| *n != old && p == "Ready").cloned().collect();
        if old_phase.as_deref() != Some("Ready") {
            assert_eq!(ready_new.len(), 1, "the old replica left before its replacement was Ready: {r:?}");
            if old_phase.is_none() {
                break ready_new[0].clone();
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the replica never moved: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(replacement.2, vec![bad as u64], "the replacement is on another GPU");

    // Another GPU turns Degraded: its replica (if any) stays, and nothing new lands on it.
    let hot = (0..4).find(|i| *i != bad && replacement.2 != vec![*i as u64]).unwrap();
    *agent.gpus.lock().unwrap() = report(4, &[(bad, "failed", xid), (hot, "degraded", "thermal throttling")]);
    wait_until("gpu recorded Degraded", LONG, || async {
        node_status(&c).await["gpu_health"][hot.to_string()]["state"] == "Degraded"
    })
    .await;
    c.apply(&model_manifest("m", 4, 1)).await;
    wait_until("2 ready, 2 pending", LONG, || async {
        let r = replicas_gpus(&c).await;
        r.iter().filter(|(_, p, _)| p == "Ready").count() == 2
            && r.iter().filter(|(_, p, _)| p == "Pending").count() == 2
    })
    .await;
    let used: BTreeSet<u64> = replicas_gpus(&c).await.into_iter().flat_map(|(_, _, g)| g).collect();
    assert!(!used.contains(&(bad as u64)) && !used.contains(&(hot as u64)), "{used:?}");
    assert!(replicas_gpus(&c).await.iter().any(|(n, p, _)| *n == replacement.0 && p == "Ready"), "kept");

    // The agent reports every GPU healthy again (after its clean probes): all four place.
    *agent.gpus.lock().unwrap() = report(4, &[]);
    wait_until("4 ready", LONG, || async { ready_count(&c).await == 4 }).await;
    let st = node_status(&c).await;
    assert!(st.get("gpu_health").is_none() && st["unhealthy_gpus"] == serde_json::json!([]), "{st}");
    c.shutdown().await;
}
