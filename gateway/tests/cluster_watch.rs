//! The endpoint table from the control plane: the gateway follows a follower's
//! `cluster.not_leader` hint to the leader, routes with the Model's routing strategy,
//! drops endpoints that leave the snapshot, and keeps routing on its last table when every
//! server is gone (static stability).

mod common;

use std::time::Duration;

use common::fake_cp::FakeCp;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_leader_and_keeps_routing_when_servers_are_gone() {
    let sims = sims(2, 50.0).await;
    let leader = FakeCp::new(None);
    leader.set_endpoints(&[(MODEL, sims[0].local_addr()), (MODEL, sims[1].local_addr())]);
    let (leader_addr, stop_leader) = leader.clone().serve().await;
    let follower = FakeCp::new(Some(leader_addr.to_string()));
    follower.put("Model", MODEL, serde_json::json!({"source": "hf://x/y", "routing": "round-robin"}));
    let (follower_addr, stop_follower) = follower.serve().await;

    let gw = gateway(cluster_gw_args(follower_addr)).await;
    let addr = gw.local_addr();
    let mut ready = false;
    for _ in 0..100 {
        if get(addr, "/readyz").await.status == 200 && gw.state().dir.routing_of(MODEL).as_str() == "round-robin" {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(ready, "no endpoint table / model routing from the control plane");
    let a = complete(addr, "x", 2, &[]).await.endpoint();
    let b = complete(addr, "x", 2, &[]).await.endpoint();
    assert_ne!(a, b, "round-robin from the Model spec alternates");

    // an endpoint leaves the snapshot
    leader.set_endpoints(&[(MODEL, sims[1].local_addr())]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..4 {
        assert_eq!(complete(addr, "x", 2, &[]).await.endpoint(), sims[1].local_addr().to_string());
    }

    // every server goes away: traffic continues on the last table
    let _ = stop_leader.send(());
    let _ = stop_follower.send(());
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        let r = complete(addr, "x", 2, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(get(addr, "/readyz").await.status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_engine_gets_the_key_the_endpoint_table_gives() {
    let keys = ["a".repeat(64), "b".repeat(64)];
    let mut engines = Vec::new();
    for k in &keys {
        let args = flotilla_sim::SimArgs { api_key: Some(k.clone()), ..sim_args(50.0) };
        engines.push(flotilla_sim::start(args).await.expect("sim starts"));
    }
    let cp = FakeCp::new(None);
    cp.put("Model", MODEL, serde_json::json!({"source": "hf://x/y", "routing": "round-robin"}));
    cp.set_keyed_endpoints(&[
        (MODEL, engines[0].local_addr(), keys[0].as_str()),
        (MODEL, engines[1].local_addr(), keys[1].as_str()),
    ]);
    let (cp_addr, stop) = cp.clone().serve().await;
    let gw = gateway(cluster_gw_args(cp_addr)).await;
    let addr = gw.local_addr();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        // A client's own Authorization is never passed on: the engine's key replaces it.
        let r = complete(addr, "x", 2, &[("authorization", "Bearer the-clients-token")]).await;
        if r.status == 200 {
            seen.insert(r.endpoint());
        }
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.len(), 2, "both keyed engines answered through the gateway: {seen:?}");

    // A table that gives the wrong key: the engine refuses, and the client sees its 401.
    cp.set_keyed_endpoints(&[(MODEL, engines[0].local_addr(), keys[1].as_str())]);
    let mut last = 0;
    for _ in 0..100 {
        last = complete(addr, "x", 2, &[]).await.status;
        if last == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last, 401, "the key came from the table, not from anywhere else");
    let _ = stop.send(());
    gw.shutdown().await;
}

/// Static backends started with a key (`vllm serve --api-key`): the gateway sends
/// `FLOTILLA_BACKEND_API_KEY` to them, and its `/v1/models` scrape (adapters) works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_backends_get_the_backend_api_key() {
    let key = "s".repeat(48);
    let args = flotilla_sim::SimArgs { api_key: Some(key.clone()), enable_lora: true, ..sim_args(50.0) };
    let engine = flotilla_sim::start(args).await.expect("sim starts");
    let args = |with_key: bool| flotilla_gateway::GatewayArgs {
        listen: "127.0.0.1:0".into(),
        no_auth: true,
        backends: vec![format!("{MODEL}=http://{}", engine.local_addr())],
        backend_api_key: with_key.then(|| key.clone()),
        scrape_interval_ms: 100,
        ..flotilla_gateway::GatewayArgs::default()
    };
    let keyless = gateway(args(false)).await;
    assert_eq!(complete(keyless.local_addr(), "x", 2, &[]).await.status, 401, "the engine refuses a keyless gateway");
    keyless.shutdown().await;
    let gw = gateway(args(true)).await;
    assert_eq!(complete(gw.local_addr(), "x", 2, &[]).await.status, 200);
    let bad = flotilla_gateway::GatewayArgs { backend_api_key: Some("bad key".into()), ..args(true) };
    assert!(bad.validate().is_err(), "a key with a space is refused at start");
    gw.shutdown().await;
}
