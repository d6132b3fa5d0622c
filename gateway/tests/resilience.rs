//! Failures of engines cost no request that had not started streaming: a killed engine's
//! requests are retried on another endpoint, an engine answering 500s is retried around
//! and ejected, and an ejected engine is probed back in.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_killed_mid_test_costs_no_unstarted_request() {
    let mut sims = sims(3, 10.0).await;
    let gw = gateway(gw_args(&sims)).await;
    let addr = gw.local_addr();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8u64 {
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = complete(addr, &text(30, c * 1000 + i), 60, &[]).await;
                if r.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.lock().unwrap().push(format!("{} {}", r.status, r.text()));
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = ok.load(Ordering::Relaxed);
    sims.remove(0).shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    let total = ok.load(Ordering::Relaxed);
    println!("requests ok: {total} ({before} before the kill), failed: {}", failed.len());
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(total > before + 10, "traffic continued after the kill");
    let retries = metric_sum(addr, "flotilla_gateway_retries_total", &[]).await;
    assert!(retries >= 1.0, "the killed engine's requests were retried ({retries})");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_engine_is_retried_around_ejected_and_probed_back() {
    let sims = sims(2, 50.0).await;
    let mut args = gw_args(&sims);
    args.eject_after_failures = 3;
    args.eject_base_ms = 300;
    let gw = gateway(args).await;
    let addr = gw.local_addr();
    let bad = sims[0].local_addr();
    let r = post(bad, "/sim/faults", serde_json::json!({"error_rate": 1.0}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for i in 0..20 {
        let r = complete(addr, &text(5, i), 2, &[("x-flotilla-routing", "round-robin")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.endpoint(), sims[1].local_addr().to_string());
    }
    let ejections = metric_sum(addr, "flotilla_gateway_ejections_total", &[&bad.to_string()]).await;
    assert!(ejections >= 1.0, "engine with 500s was never ejected");
    let retries = metric_sum(addr, "flotilla_gateway_retries_total", &[&bad.to_string()]).await;
    assert!((1.0..=6.0).contains(&retries), "ejection stops retries early: {retries}");
    // healed: after the ejection time a probe succeeds and traffic comes back
    let r = post(bad, "/sim/faults", serde_json::json!({"reset": true}), &[]).await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut back = false;
    for i in 0..10 {
        let r = complete(addr, &text(5, i), 2, &[("x-flotilla-routing", "round-robin")]).await;
        assert_eq!(r.status, 200);
        back |= r.endpoint() == bad.to_string();
    }
    assert!(back, "the healed engine never got traffic again");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream_request() {
    let sims = sims(1, 1.0).await;
    let gw = gateway(gw_args(&sims)).await;
    let addr = gw.local_addr();
    let body =
        serde_json::json!({"model": MODEL, "prompt": "go", "max_tokens": 5000, "ignore_eos": true, "stream": true});
    let req = http::Request::post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    use http_body_util::BodyExt;
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    let engine = sims[0].local_addr();
    let running = |v: f64| async move {
        let m = get(engine, "/metrics").await.text();
        m.lines().any(|l| {
            l.starts_with("vllm:num_requests_running")
                && l.rsplit_once(' ').and_then(|(_, x)| x.parse::<f64>().ok()) == Some(v)
        })
    };
    assert!(running(1.0).await);
    drop(body);
    let mut cancelled = false;
    for _ in 0..100 {
        if running(0.0).await {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cancelled, "engine still runs the request after the client left");
    gw.shutdown().await;
}
