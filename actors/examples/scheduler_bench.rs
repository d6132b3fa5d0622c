//! Scheduler benchmark (bench/scheduler): one in-process server running the controllers,
//! 1,000 in-process nodes × 8 GPUs (registered through Raft, heartbeats recorded in the
//! leader's memory), 500 models totalling 6,000 replicas. Reports the time until every
//! replica is placed, Raft entries written, process RSS, and the time to reschedule the
//! replicas of 50 failed nodes.
//!
//! With `gangs` as third argument: the nodes carry `flotilla.io/rack` labels (40 nodes per
//! rack) and the models are multi-node: MODELS models of 4 replicas, each a gang of 4 nodes x
//! 8 GPUs placed `pack` (MODELS = 50: 200 gangs). The failure phase then measures gang
//! recovery: every gang with a member on a failed node replaced by one placed elsewhere (no
//! agents run here, so the time is TTL + grace + the controllers' work, not engine starts).
//!
//! Run: `cargo run --release -p flotilla-actors --example scheduler_bench [-- NODES MODELS [gangs]]`
use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use flotilla_actors::{extensions_with_probe, ActorsConfig, Ctx};
use flotilla_api::spec::{Gpu, NodeSpec, NodeState, NodeStatus};
use flotilla_api::{Kind, LabelSelector, ObjectKey, ObjectName};
use flotilla_cluster::ServerConfig;
use flotilla_storage::{Command, TxnOp};

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn name(s: &str) -> ObjectName {
    s.parse().expect("name")
}

/// (placed replicas, replicas on the given nodes), not counting Draining ones: a gang that
/// lost a member drains on its other members' nodes until their agents stop it, and this
/// benchmark runs no agents. A gang is on a node when any of its members is.
fn placed(ctx: &Ctx, failed: &[ObjectName]) -> (usize, usize) {
    let (list, _) = ctx.handle.reader().list(Kind::Replica, &LabelSelector::default());
    let mut placed = 0;
    let mut on_failed = 0;
    for o in list.iter().filter(|o| o.status["phase"].as_str() != Some("Draining")) {
        let Some(head) = o.spec["node"].as_str() else { continue };
        placed += 1;
        let members = o.spec["members"].as_array();
        let nodes: Vec<&str> = match members.filter(|m| !m.is_empty()) {
            Some(m) => m.iter().filter_map(|x| x["node"].as_str()).collect(),
            None => vec![head],
        };
        if nodes.iter().any(|n| failed.iter().any(|f| f.as_str() == *n)) {
            on_failed += 1;
        }
    }
    (placed, on_failed)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let gangs = std::env::args().any(|a| a == "gangs");
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let nodes = args.first().copied().unwrap_or(1000);
    let models = args.get(1).copied().unwrap_or(if gangs { 50 } else { 500 });
    let replicas_per_model = if gangs { 4 } else { 12 };
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig {
        grpc_addr: "127.0.0.1:0".parse()?,
        http_addr: "127.0.0.1:0".parse()?,
        bootstrap: true,
        watch_history: 200_000,
        snapshot_every: 1_000_000,
        ..ServerConfig::new(1, dir.path().join("server-1"))
    };
    config.request_timeout = Duration::from_secs(30);
    let actors = ActorsConfig {
        node_ttl_ms: 2_000,
        reschedule_grace_ms: 2_000,
        reconcile_interval_ms: 500,
        ..ActorsConfig::default()
    };
    let (ext, probe) = extensions_with_probe(actors.clone());
    let server = flotilla_cluster::start_with(config, ext).await?;
    let ctx = loop {
        if let Some(ctx) = probe.ctx().filter(|c| c.ensure_leader().is_ok()) {
            break ctx;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let entries = |s: &flotilla_cluster::ServerHandle| s.raft().metrics().borrow().last_log_index.unwrap_or(0);

    // Nodes, 100 per transaction, and a heartbeat loop for the live ones.
    let names: Vec<ObjectName> = (0..nodes).map(|i| name(&format!("node-{i:04}"))).collect();
    for chunk in names.chunks(100) {
        let ops = chunk
            .iter()
            .map(|n| {
                let spec = NodeSpec {
                    address: "10.0.0.1".into(),
                    gpus: (0..8).map(|index| Gpu { index, gpu_type: "H100-80GB".into(), memory_mib: 81_920 }).collect(),
                    agent_id: format!("agent-{n}"),
                    cordoned: false,
                    draining: false,
                };
                let status = NodeStatus { state: NodeState::Ready, ..NodeStatus::default() };
                let rack = n.as_str().trim_start_matches("node-").parse::<usize>().unwrap_or(0) / 40;
                let labels = if gangs {
                    BTreeMap::from([("flotilla.io/rack".to_owned(), format!("rack-{rack:02}"))])
                } else {
                    BTreeMap::new()
                };
                Ok(TxnOp::Put {
                    key: ObjectKey { kind: Kind::Node, name: n.clone() },
                    uid: uuid::Uuid::new_v4().to_string(),
                    labels,
                    spec: serde_json::to_value(spec)?,
                    status: Some(serde_json::to_value(status)?),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        ctx.handle.propose(Command::Txn { compares: vec![], ops }).await?;
    }
    let n_failed = (nodes / 20).clamp(1, 50);
    let failed: Vec<ObjectName> = names.iter().step_by(nodes / n_failed).take(n_failed).cloned().collect();
    let dead = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (ctx, names, failed, dead) = (ctx.clone(), names.clone(), failed.clone(), dead.clone());
        tokio::spawn(async move {
            loop {
                let stop = dead.load(std::sync::atomic::Ordering::Relaxed);
                for n in &names {
                    if !(stop && failed.contains(n)) {
                        ctx.record_heartbeat(n, "bench");
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_mib();
    let e0 = entries(&server);

    // 500 models: 80 % ask 1 GPU per replica, 20 % ask 2.
    let start = Instant::now();
    let mut total = 0;
    let mut pending = Vec::new();
    for m in 0..models {
        let gpus = if m % 5 == 0 { 2 } else { 1 };
        total += replicas_per_model;
        let mut spec = serde_json::json!({
            "engine": "sim", "source": format!("file:///models/m{m}"), "replicas": replicas_per_model, "gpus": gpus,
            "gpu_types": [], "engine_args": [], "routing": "least-request"
        });
        if gangs {
            // written straight through Raft, as the one-node models are
            spec["gpus"] = 32.into();
            spec["topology"] = serde_json::json!({"nodes": 4, "gpus_per_node": 8, "placement": "pack"});
        }
        let cmd = Command::Put {
            key: ObjectKey { kind: Kind::Model, name: name(&format!("model-{m:03}")) },
            uid: uuid::Uuid::new_v4().to_string(),
            labels: BTreeMap::new(),
            spec,
            expected_revision: None,
        };
        let h = ctx.handle.clone();
        pending.push(tokio::spawn(async move { h.propose(cmd).await }));
    }
    for p in pending {
        p.await??;
    }
    let applied = start.elapsed();
    loop {
        if placed(&ctx, &[]).0 >= total {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(300), "not all placed: {:?}", placed(&ctx, &[]));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let all_placed = start.elapsed();
    let e1 = entries(&server);
    let rss_after = rss_mib();
    let m = ctx.metrics.snapshot();

    let kind = if gangs { "gangs of 4 nodes x 8 GPUs" } else { "replicas" };
    println!("nodes={nodes} gpus_per_node=8 models={models} {kind}={total}");
    println!("models applied ({models} Raft writes, concurrent): {:.2} s", applied.as_secs_f64());
    println!("time to all placed (from first apply): {:.2} s", all_placed.as_secs_f64());
    println!("raft entries written while placing: {}", e1 - e0);
    println!("rss: {rss_before:.0} MiB before models, {rss_after:.0} MiB after placement");
    for (k, v) in m {
        println!("  {k} {v}");
    }
    // Fail nodes: heartbeats stop; wait until no replica is left on them and all are placed
    // (for gangs: every gang with a member there replaced by one placed elsewhere).
    let (_, on_failed) = placed(&ctx, &failed);
    let killed = Instant::now();
    dead.store(true, std::sync::atomic::Ordering::Relaxed);
    loop {
        let (p, f) = placed(&ctx, &failed);
        if p >= total && f == 0 {
            break;
        }
        anyhow::ensure!(killed.elapsed() < Duration::from_secs(120), "not rescheduled: placed {p}, on failed {f}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let resched = killed.elapsed();
    let e2 = entries(&server);
    let floor = Duration::from_millis(actors.node_ttl_ms + actors.reschedule_grace_ms);

    println!(
        "{n_failed} failed nodes ({on_failed} replicas): rescheduled after {:.2} s (ttl+grace {:.1} s, so {:.2} s of work); {} raft entries",
        resched.as_secs_f64(),
        floor.as_secs_f64(),
        resched.saturating_sub(floor).as_secs_f64(),
        e2 - e1
    );
    server.shutdown().await;
    Ok(())
}
