//! `--startup-seconds`: a sim that is still "loading weights" answers /health and the
//! inference endpoints with 503 (metrics and version at once), then serves normally after
//! startup_seconds / speedup wall seconds.

mod common;

use std::time::Duration;
use tokio::time::Instant;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_inference_are_503_until_startup_seconds_pass() {
    // 40 simulated seconds at speedup 50 = 0.8 s wall.
    let started = Instant::now();
    let sim = start(flotilla_sim::SimArgs { startup_seconds: 40.0, ..args() }).await;
    let a = sim.local_addr();

    assert_eq!(request(a, "GET", "/health", None).await.status, 503);
    let r = complete(a, "demo", "hello there", 4).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("starting"), "{}", r.body);
    assert_eq!(request(a, "GET", "/v1/models", None).await.status, 503);
    assert_eq!(request(a, "GET", "/metrics", None).await.status, 200);
    assert_eq!(request(a, "GET", "/version", None).await.status, 200);

    // Poll /health (bounded) until it turns 200; it must not be before 0.8 s.
    let mut healthy_at = None;
    for _ in 0..100 {
        if request(a, "GET", "/health", None).await.status == 200 {
            healthy_at = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let healthy_at = healthy_at.expect("healthy within 5 s");
    assert!(healthy_at >= Duration::from_millis(800), "healthy after {healthy_at:?}, before 0.8 s");
    assert!(healthy_at < Duration::from_secs(3), "healthy only after {healthy_at:?}");
    assert_eq!(complete(a, "demo", "hello there", 4).await.status, 200);
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_startup_is_ready_at_once() {
    let sim = start(args()).await;
    let a = sim.local_addr();
    assert_eq!(request(a, "GET", "/health", None).await.status, 200);
    assert_eq!(complete(a, "demo", "hello there", 4).await.status, 200);
    sim.shutdown().await.unwrap();
}
