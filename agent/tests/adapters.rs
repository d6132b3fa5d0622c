//! LoRA adapters on real `sim` engine processes, driven by a fake leader's `Assign`s:
//! loads and unloads without restarting the engine, failures reported and not retried,
//! reloads after an engine crash and reconciliation of adopted engines.

mod common;

use std::time::Duration;

use common::*;
use flotilla_api::pb;

fn with_adapters(mut r: pb::ReplicaAssignment, adapters: &[(&str, &str)]) -> pb::ReplicaAssignment {
    r.adapters =
        adapters.iter().map(|(n, s)| pb::AdapterAssignment { name: n.to_string(), source: s.to_string() }).collect();
    r
}

fn engine<'a>(engines: &'a [pb::EngineReport], name: &str) -> Option<&'a pb::EngineReport> {
    engines.iter().find(|e| e.replica == name)
}

/// (name, state) of each adapter of the report, in report order.
fn states(e: &pb::EngineReport) -> Vec<(String, String)> {
    e.adapters.iter().map(|a| (a.name.clone(), a.state.clone())).collect()
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// A ready engine whose report has exactly these adapters, all loaded, and lists them in
/// `loaded_adapters`.
fn all_loaded(engines: &[pb::EngineReport], replica: &str, names: &[&str]) -> Option<pb::EngineReport> {
    let e = engine(engines, replica).filter(|e| e.state == "ready")?;
    let want: Vec<(String, String)> = names.iter().map(|n| (n.to_string(), "loaded".to_string())).collect();
    let loaded: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    (states(e) == want && sorted(&e.loaded_adapters) == sorted(&loaded)).then(|| e.clone())
}

/// The engine's own `/v1/models` answer (with its key).
async fn engine_models(e: &pb::EngineReport) -> (u16, String) {
    http_request_with_key(&e.endpoint, "GET", "/v1/models", "", &e.api_key).await.expect("engine answers /v1/models")
}

/// The adapter ids the engine's own `/v1/models` lists, sorted.
async fn engine_adapters(e: &pb::EngineReport) -> Vec<String> {
    let (status, body) = engine_models(e).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut ids: Vec<String> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|m| !m["parent"].is_null())
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn kill(pid: u32) {
    let killed = flotilla_testkit::procs::signal(pid, flotilla_testkit::procs::Signal::KILL);
    assert!(killed, "kill engine {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_follow_the_assignment_without_restarting_the_engine() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = agent_args(&[server.addr], dir.path(), "node-lora", &["--restart-backoff-initial-ms", "100"]);
    let agent = TestAgent::start(args).await;
    let base = sim_replica("l-0", "base", &[]);

    server.assign(vec![with_adapters(base.clone(), &[("a", "sim://a"), ("b", "sim://b?rank=8")])]);
    let first = eventually(30, "a and b loaded", || {
        let _ = agent.reports();
        all_loaded(&server.engines(), "l-0", &["a", "b"])
    })
    .await;
    assert_eq!(engine_adapters(&first).await, ["a", "b"]);

    // Only the adapter list changes: a unloaded, c loaded, same process.
    server.assign(vec![with_adapters(base.clone(), &[("b", "sim://b?rank=8"), ("c", "sim://c")])]);
    let second = eventually(20, "b and c loaded, a gone", || all_loaded(&server.engines(), "l-0", &["b", "c"])).await;
    assert_eq!(engine_adapters(&second).await, ["b", "c"]);
    assert_eq!((second.pid, second.endpoint.as_str(), second.restarts), (first.pid, first.endpoint.as_str(), 0));
    assert!(alive(first.pid));

    // A source that does not exist: failed with the reason, not retried, engine untouched.
    let bad = ("bad", "file:///does/not/exist");
    server.assign(vec![with_adapters(base.clone(), &[("b", "sim://b?rank=8"), ("c", "sim://c"), bad])]);
    let failed = eventually(20, "bad adapter failed", || {
        let e = engine(&server.engines(), "l-0")?.clone();
        e.adapters.iter().find(|a| a.name == "bad" && a.state == "failed").cloned()
    })
    .await;
    assert!(failed.reason.contains("/does/not/exist"), "{}", failed.reason);
    tokio::time::sleep(Duration::from_millis(500)).await; // several heartbeats and scrapes
    let e = engine(&server.engines(), "l-0").cloned().unwrap();
    assert_eq!((e.state.as_str(), e.pid), ("ready", first.pid), "a failed adapter leaves the engine alone");
    assert_eq!(
        states(&e),
        [("b".into(), "loaded".into()), ("c".into(), "loaded".into()), ("bad".into(), "failed".into())]
    );
    assert_eq!(engine_adapters(&e).await, ["b", "c"]);

    // The engine dies: the new process gets every desired adapter again.
    server.assign(vec![with_adapters(base.clone(), &[("b", "sim://b?rank=8"), ("c", "sim://c")])]);
    eventually(20, "bad dropped from the report", || all_loaded(&server.engines(), "l-0", &["b", "c"])).await;
    kill(first.pid);
    let restarted = eventually(30, "restarted engine has b and c again", || {
        let _ = agent.reports();
        all_loaded(&server.engines(), "l-0", &["b", "c"]).filter(|e| e.pid != first.pid)
    })
    .await;
    assert_eq!(restarted.restarts, 1);
    assert_eq!(restarted.api_key, first.api_key, "a restart keeps the engine's key");
    assert_eq!(engine_adapters(&restarted).await, ["b", "c"]);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_load_is_reported_before_the_next_regular_heartbeat() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Heartbeats every 10 s: only an early heartbeat can report the load in time.
    let mut args = agent_args(&[server.addr], dir.path(), "node-early", &[]);
    args.heartbeat_interval_ms = 10_000;
    let agent = TestAgent::start(args).await;
    // A real adapter directory too: fetched into the node cache, then loaded from there.
    let lora = tempfile::tempdir().unwrap();
    std::fs::write(lora.path().join("adapter_config.json"), r#"{"r": 8}"#).unwrap();
    let file_source = format!("file://{}", lora.path().display());
    eventually(20, "first heartbeat", || (server.heartbeats() >= 1).then_some(())).await;
    let adapters = [("a", "sim://a"), ("x", file_source.as_str())];
    server.assign(vec![with_adapters(sim_replica("e-0", "base", &[]), &adapters)]);
    let e = eventually(8, "adapters loaded in a heartbeat", || {
        let _ = agent.reports();
        all_loaded(&server.engines(), "e-0", &["a", "x"])
    })
    .await;
    assert!(server.heartbeats() < 10, "early heartbeats are rate-limited: {}", server.heartbeats());
    assert_eq!(engine_adapters(&e).await, ["a", "x"]);
    let (_, body) = engine_models(&e).await;
    let cache = dir.path().join("models").display().to_string();
    assert!(body.contains(&cache), "x loaded from the node cache {cache}: {body}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_reconciles_the_adapters_of_adopted_engines() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let base = sim_replica("d-0", "base", &[]);
    server.assign(vec![with_adapters(base.clone(), &[("a", "sim://a"), ("b", "sim://b")])]);
    let mut first = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-adopt-lora", &[])).await;
    let before = eventually(30, "a and b loaded", || {
        let _ = first.reports();
        all_loaded(&server.engines(), "d-0", &["a", "b"])
    })
    .await;
    first.shutdown(false).await;
    assert!(alive(before.pid));

    // While no agent runs, the leader moves on: b's source changes, a goes, c comes.
    server.assign(vec![with_adapters(base.clone(), &[("b", "sim://b?rank=4"), ("c", "sim://c")])]);
    let second = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-adopt-lora", &[])).await;
    second.pids.lock().unwrap().insert(before.pid);
    let after = eventually(30, "adopted engine holds b and c", || {
        let r = second.reports();
        all_loaded(&r, "d-0", &["b", "c"])
    })
    .await;
    assert_eq!(after.pid, before.pid, "adopted, not restarted");
    assert_eq!(after.api_key, before.api_key, "adopted with the key it was started with");
    let (_, body) = engine_models(&after).await;
    assert!(body.contains("sim://b?rank=4"), "b reloaded from its new source: {body}");
    assert_eq!(engine_adapters(&after).await, ["b", "c"]);
    drop(second);
}
