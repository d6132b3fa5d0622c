//! QoS with saturated engines: critical requests wait little while sheddable ones are
//! shed with 503 + Retry-After, and two tenants at 10:1 offered load get near-equal token
//! throughput (virtual token counter fairness).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use common::fake_cp::FakeCp;
use common::*;

fn saturating_args(sims: &[flotilla_sim::SimHandle]) -> flotilla_gateway::GatewayArgs {
    let mut a = gw_args(sims);
    a.max_in_flight_per_endpoint = 2;
    a.max_engine_waiting = 0;
    a.max_kv_cache_usage = 0.0;
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_stays_fast_while_sheddable_is_shed() {
    let sims = sims(2, 10.0).await;
    let mut args = saturating_args(&sims);
    args.queue_deadline_sheddable_ms = 300;
    let gw = gateway(args).await;
    let addr = gw.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<HashMap<(String, u16), usize>>> = Arc::default();
    let retry_after_seen = Arc::new(AtomicBool::new(false));
    let mut bg = Vec::new();
    for c in 0..36u64 {
        let class = if c % 3 == 2 { "sheddable" } else { "standard" };
        let (stop, outcomes, ra) = (stop.clone(), outcomes.clone(), retry_after_seen.clone());
        bg.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = complete(addr, &text(20, c * 10_000 + i), 40, &[("x-flotilla-priority", class)]).await;
                if r.status == 503 && r.header("retry-after").is_some() {
                    ra.store(true, Ordering::Relaxed);
                }
                *outcomes.lock().unwrap().entry((class.to_string(), r.status)).or_default() += 1;
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut crit = Vec::new();
    for i in 0..40 {
        let t = Instant::now();
        let r = complete(addr, &text(20, 900_000 + i), 5, &[("x-flotilla-priority", "critical")]).await;
        assert_eq!(r.status, 200, "critical request failed: {}", r.text());
        crit.push(t.elapsed().as_secs_f64());
    }
    stop.store(true, Ordering::Relaxed);
    for b in bg {
        b.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let std_lat = metric_sum(addr, "flotilla_gateway_queue_wait_seconds_sum", &["priority=\"standard\""]).await
        / metric_sum(addr, "flotilla_gateway_queue_wait_seconds_count", &["priority=\"standard\""]).await;
    let crit_wait_mean =
        metric_sum(addr, "flotilla_gateway_queue_wait_seconds_sum", &["priority=\"critical\""]).await / 40.0;
    let p99 = percentile(&mut crit, 0.99);
    println!(
        "critical latency p50 {:.3}s p99 {:.3}s, critical mean queue wait {:.3}s, standard mean queue wait {:.3}s, outcomes {outcomes:?}",
        percentile(&mut crit, 0.5),
        p99,
        crit_wait_mean,
        std_lat
    );
    let shed = outcomes.get(&("sheddable".to_string(), 503)).copied().unwrap_or(0);
    assert!(shed > 0, "no sheddable request was shed: {outcomes:?}");
    assert!(retry_after_seen.load(Ordering::Relaxed), "503 without Retry-After");
    assert_eq!(outcomes.get(&("standard".to_string(), 503)), None, "standard requests were dropped: {outcomes:?}");
    assert!(crit_wait_mean * 3.0 < std_lat, "critical waits {crit_wait_mean:.3}s vs standard {std_lat:.3}s");
    assert!(p99 < 0.5, "critical p99 {p99:.3}s");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_at_ten_to_one_load_get_near_equal_tokens() {
    let sims = sims(2, 10.0).await;
    let cp = FakeCp::new(None);
    cp.put("Tenant", "heavy", serde_json::json!({"api_keys": [flotilla_api::spec::hash_api_key("key-heavy-1")]}));
    cp.put("Tenant", "light", serde_json::json!({"api_keys": [flotilla_api::spec::hash_api_key("key-light-1")]}));
    let (cp_addr, _stop) = cp.serve().await;
    let mut args = saturating_args(&sims);
    args.no_auth = false;
    args.server = vec![cp_addr.to_string()];
    let gw = gateway(args).await;
    let addr = gw.local_addr();
    for _ in 0..100 {
        if send(addr, "GET", "/v1/models", b"", &[("authorization", "Bearer key-light-1")]).await.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let tokens: Arc<Mutex<HashMap<&'static str, u64>>> = Arc::default();
    let mut clients = Vec::new();
    for (tenant, key, n) in [("heavy", "Bearer key-heavy-1", 40u64), ("light", "Bearer key-light-1", 4)] {
        for c in 0..n {
            let (stop, measuring, tokens) = (stop.clone(), measuring.clone(), tokens.clone());
            clients.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let r = complete(addr, &text(20, c * 1000 + i), 30, &[("authorization", key)]).await;
                    assert_eq!(r.status, 200, "{}", r.text());
                    if measuring.load(Ordering::Relaxed) {
                        let v = r.json();
                        let t = v["usage"]["completion_tokens"].as_u64().unwrap()
                            + v["usage"]["prompt_tokens"].as_u64().unwrap();
                        *tokens.lock().unwrap().entry(tenant).or_default() += t;
                    }
                    i += 1;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let t = tokens.lock().unwrap().clone();
    let (h, l) = (t["heavy"] as f64, t["light"] as f64);
    let ratio = h / l;
    println!("offered load 10:1 (40 vs 4 closed-loop clients); tokens heavy {h} light {l}; measured ratio {ratio:.2}");
    assert!((0.5..=2.0).contains(&ratio), "token throughput ratio heavy/light {ratio:.2} is not near 1");
    gw.shutdown().await;
}
