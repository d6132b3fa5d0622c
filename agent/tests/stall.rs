//! Engine-level signs: a live engine that holds running requests but generates no tokens
//! (the sim's `stall` fault) is killed and restarted, with the reason in its report.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_engine_is_restarted_with_the_reason() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = agent_args(
        &[server.addr],
        dir.path(),
        "node-stall",
        &[
            "--sim-args=--speedup 1 --allow-faults",
            "--engine-stall-timeout-s",
            "2",
            "--restart-backoff-initial-ms",
            "1500",
        ],
    );
    let agent = TestAgent::start(args).await;
    server.assign(vec![sim_replica("s-0", "m", &[])]);
    let ready = |server: &FakeServer| {
        server.engines().into_iter().find(|e| e.replica == "s-0" && e.state == "ready" && e.pid > 0)
    };
    let first = eventually(30, "ready", || ready(&server)).await;
    let (endpoint, key) = (first.endpoint.clone(), first.api_key.clone());
    let body = r#"{"model":"m","prompt":"a very long story","max_tokens":4000,"ignore_eos":true,"stream":true}"#;
    let (e, k) = (endpoint.clone(), key.clone());
    let _stream = tokio::spawn(async move { http_request_with_key(&e, "POST", "/v1/completions", body, &k).await });
    eventually(10, "the request runs", || {
        server.engines().into_iter().find(|e| e.replica == "s-0" && e.num_requests_running >= 1.0).map(|_| ())
    })
    .await;
    // Still healthy and busy for a few seconds: no restart while tokens flow.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(ready(&server).map(|e| e.pid), Some(first.pid), "a busy engine that makes progress is left alone");
    let (status, _) = http_request(&endpoint, "POST", "/sim/faults", r#"{"stall": true}"#).await.unwrap();
    assert_eq!(status, 200);
    let crashed = eventually(20, "restarted for the stall", || {
        server.engines().into_iter().find(|e| e.replica == "s-0" && e.reason.contains("stalled"))
    })
    .await;
    assert!(crashed.reason.contains("running requests and no new tokens for"), "{}", crashed.reason);
    let again =
        eventually(30, "ready again with a new process", || ready(&server).filter(|e| e.pid != first.pid)).await;
    assert_eq!(again.restarts, 1);
    assert!(!alive(first.pid));
    drop(agent);
}
