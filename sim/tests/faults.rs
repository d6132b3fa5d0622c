//! Fault injection on `/sim/faults` (with `--allow-faults`): error rate, stall, hang, slow
//! and crash each do what the chaos tests expect, and clearing them restores service.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn fault_args() -> flotilla_sim::SimArgs {
    flotilla_sim::SimArgs { allow_faults: true, ..args() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_stall_hang_and_slow() {
    let sim = start(fault_args()).await;
    let a = sim.local_addr();

    let r = post(a, "/sim/faults", json!({"error_rate": 1.0})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["error_rate"], 1.0);
    let r = complete(a, "demo", "x", 2).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["type"], "InternalServerError");
    assert_eq!(get(a, "/health").await.status, 200, "only inference fails");
    assert_eq!(post(a, "/sim/faults", json!({"error_rate": 2.0})).await.status, 400);
    assert_eq!(post(a, "/sim/faults", json!({"explode": true})).await.status, 400);
    assert_eq!(request(a, "DELETE", "/sim/faults", None).await.status, 200);
    assert_eq!(complete(a, "demo", "x", 2).await.status, 200);

    // stall: accepted requests produce nothing until lifted
    post(a, "/sim/faults", json!({"stall": true})).await;
    let pending = tokio::spawn(async move { complete(a, "demo", "stalled", 4).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "a stalled engine answered");
    let mm = metrics(a).await;
    assert_eq!(m(&mm, "vllm:num_requests_waiting") + m(&mm, "vllm:num_requests_running"), 1.0);
    post(a, "/sim/faults", json!({"stall": false})).await;
    let r = tokio::time::timeout(Duration::from_secs(10), pending).await.unwrap().unwrap();
    assert_eq!(r.status, 200);

    // hang: nothing answers except /sim/faults
    post(a, "/sim/faults", json!({"hang": true})).await;
    let hung = tokio::time::timeout(Duration::from_millis(300), get(a, "/health")).await;
    assert!(hung.is_err(), "a hung server answered /health");
    assert_eq!(get(a, "/sim/faults").await.json()["hang"], true);
    post(a, "/sim/faults", json!({"hang": false})).await;
    assert_eq!(get(a, "/health").await.status, 200);

    // slow: step time multiplied
    let m0 = metrics(a).await;
    complete(a, "demo", &text(200, 1), 8).await;
    let m1 = metrics(a).await;
    post(a, "/sim/faults", json!({"slow_factor": 10.0})).await;
    complete(a, "demo", &text(200, 2), 8).await;
    let m2 = metrics(a).await;
    let (fast, slow) = (
        mean_delta(&m0, &m1, "vllm:e2e_request_latency_seconds"),
        mean_delta(&m1, &m2, "vllm:e2e_request_latency_seconds"),
    );
    assert!(slow > 5.0 * fast, "e2e {fast} -> {slow} with slow_factor 10");
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_stops_an_in_process_server() {
    let mut sim = start(fault_args()).await;
    let a = sim.local_addr();
    assert_eq!(post(a, "/sim/faults", json!({"crash": true})).await.status, 200);
    tokio::time::timeout(Duration::from_secs(10), sim.stopped()).await.expect("server stops").unwrap();
    assert!(tokio::net::TcpStream::connect(a).await.is_err(), "still accepting after a crash");
}
