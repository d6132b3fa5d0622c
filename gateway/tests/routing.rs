//! Each routing strategy's defining behaviour through the gateway against sim engines:
//! least-request avoids a busy engine, prefix-cache keeps a long prefix on one engine and
//! spills over under imbalance, session affinity sticks and fails over, LoRA adapters go
//! only where they are loaded, and the per-request override header is validated.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_a_busy_engine() {
    let sims = sims(2, 10.0).await;
    let gw = gateway(gw_args(&sims)).await;
    // make engine 0 busy with traffic that does not pass through this gateway
    let busy = sims[0].local_addr();
    let mut load = Vec::new();
    for i in 0..12 {
        load.push(tokio::spawn(async move {
            let body =
                serde_json::json!({"model": MODEL, "prompt": text(50, i), "max_tokens": 3000, "ignore_eos": true});
            let _ = post(busy, "/v1/completions", body, &[]).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // two scrapes
    let mut picks: HashMap<String, usize> = HashMap::new();
    for i in 0..10 {
        let r = complete(gw.local_addr(), &text(20, 100 + i), 4, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *picks.entry(r.endpoint()).or_default() += 1;
    }
    assert_eq!(picks.get(&sims[1].local_addr().to_string()), Some(&10), "{picks:?}");
    for l in load {
        l.abort();
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_keeps_a_prefix_on_one_engine_and_spills_under_imbalance() {
    let sims = sims(4, 10.0).await;
    let gw = gateway(gw_args(&sims)).await;
    let addr = gw.local_addr();
    let prefix = text(600, 7);
    let hdr = [("x-flotilla-routing", "prefix-cache")];
    let mut first = None;
    for i in 0..8 {
        let r = complete(addr, &format!("{prefix} question {i}"), 2, &hdr).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.endpoint();
        assert_eq!(first.get_or_insert(e.clone()), &e, "repeat {i} of the prefix moved");
    }
    // a different prefix may go elsewhere; the first stays put
    let other = complete(addr, &format!("{} question", text(600, 8)), 2, &hdr).await;
    assert_eq!(other.status, 200);
    // a burst of one hot prefix: the imbalance guard spreads it
    let mut tasks = Vec::new();
    for i in 0..40 {
        let p = format!("{prefix} burst {i}");
        tasks.push(tokio::spawn(
            async move { complete(addr, &p, 300, &[("x-flotilla-routing", "prefix-cache")]).await },
        ));
    }
    let mut picks: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        *picks.entry(r.endpoint()).or_default() += 1;
    }
    let hot = picks.get(first.as_ref().unwrap()).copied().unwrap_or(0);
    println!("burst of 40 with one prefix: {picks:?}");
    assert!(picks.len() >= 2, "the hot prefix never spilled: {picks:?}");
    assert!(hot >= 8, "the prefix holder should take the first share: {picks:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_affinity_sticks_and_fails_over() {
    let mut sims = sims(3, 50.0).await;
    let gw = gateway(gw_args(&sims)).await;
    let addr = gw.local_addr();
    let hdr = [("x-flotilla-routing", "session-affinity"), ("x-session-id", "user-42")];
    let mut home = None;
    for i in 0..6 {
        let r = complete(addr, &text(10, i), 2, &hdr).await;
        assert_eq!(r.status, 200);
        let e = r.endpoint();
        assert_eq!(home.get_or_insert(e.clone()), &e);
    }
    // other sessions spread
    let mut seen = std::collections::HashSet::new();
    for i in 0..9 {
        let s = format!("other-{i}");
        let r = complete(addr, "x", 2, &[("x-flotilla-routing", "session-affinity"), ("x-session-id", &s)]).await;
        seen.insert(r.endpoint());
    }
    assert!(seen.len() >= 2, "{seen:?}");
    // the home engine dies: the session moves, without a failed request, and sticks again
    let home = home.unwrap();
    let i = sims.iter().position(|s| s.local_addr().to_string() == home).unwrap();
    sims.remove(i).shutdown().await.unwrap();
    let mut new_home = None;
    for i in 0..6 {
        let r = complete(addr, &text(10, i), 2, &hdr).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.endpoint();
        assert_ne!(e, home);
        assert_eq!(new_home.get_or_insert(e.clone()), &e);
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_adapters_route_only_to_engines_that_loaded_them() {
    let mut a = Vec::new();
    for _ in 0..2 {
        a.push(
            flotilla_sim::start(flotilla_sim::SimArgs { enable_lora: true, max_loras: 2, ..sim_args(50.0) })
                .await
                .unwrap(),
        );
    }
    let r = post(
        a[1].local_addr(),
        "/v1/load_lora_adapter",
        serde_json::json!({"lora_name": "sql", "lora_path": env!("CARGO_MANIFEST_DIR")}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let gw = gateway(gw_args(&a)).await;
    let addr = gw.local_addr();
    // wait for the poller to see the adapter
    let mut listed = false;
    for _ in 0..50 {
        let m = get(addr, "/v1/models").await.json();
        if m["data"].as_array().unwrap().iter().any(|x| x["id"] == "sql" && x["parent"] == MODEL) {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(listed, "adapter never listed");
    for strategy in ["least-request", "round-robin", "random"] {
        for _ in 0..4 {
            let body = serde_json::json!({"model": "sql", "prompt": "select", "max_tokens": 2});
            let r = post(addr, "/v1/completions", body, &[("x-flotilla-routing", strategy)]).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.endpoint(), a[1].local_addr().to_string(), "{strategy}");
        }
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_serves_and_unknown_names_are_rejected() {
    let sims = sims(2, 50.0).await;
    let gw = gateway(gw_args(&sims)).await;
    let addr = gw.local_addr();
    for s in flotilla_api::spec::RoutingStrategy::ALL {
        let r = complete(addr, "hello", 2, &[("x-flotilla-routing", s.as_str()), ("x-session-id", "s")]).await;
        assert_eq!(r.status, 200, "{}: {}", s.as_str(), r.text());
        assert!(sims.iter().any(|x| x.local_addr().to_string() == r.endpoint()));
    }
    let r = complete(addr, "hello", 2, &[("x-flotilla-routing", "fastest")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "invalid_routing");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    for s in flotilla_api::spec::RoutingStrategy::ALL {
        assert!(msg.contains(s.as_str()), "{msg}");
    }
    gw.shutdown().await;
}
