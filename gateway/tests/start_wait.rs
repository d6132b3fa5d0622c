//! Starting a gateway (a restart in a rolling upgrade): until its first view of the
//! cluster (an endpoint table and the Model, Tenant and Adapter lists) arrives, its listener
//! holds connections instead of answering `no_endpoint_table`, so the traffic a balancer
//! sends a just-restarted gateway is served; past `--start-wait-s` it serves what it has.

mod common;

use std::time::Duration;

use common::fake_cp::FakeCp;
use common::*;
use flotilla_testkit::ports::free_port;
use tokio::time::Instant;

fn following(server: &str, start_wait_s: u64) -> flotilla_gateway::GatewayArgs {
    flotilla_gateway::GatewayArgs { start_wait_s, ..cluster_gw_args(server) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_before_the_first_endpoint_table_is_held_and_served() {
    let sims = sims(1, 50.0).await;
    let cp_addr = format!("127.0.0.1:{}", free_port().unwrap());
    let gw = gateway(following(&cp_addr, 10)).await;
    let addr = gw.local_addr();
    // The control plane answers only a second later (its leader restarting, say).
    let early = tokio::spawn(complete(addr, "before the table", 4, &[]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!early.is_finished(), "answered before the gateway knew any endpoint");
    let cp = FakeCp::new(None);
    cp.put("Model", MODEL, serde_json::json!({"source": "hf://x/y"}));
    cp.set_endpoints(&[(MODEL, sims[0].local_addr())]);
    let (_, _stop_cp) = cp.serve_on(&cp_addr).await;
    let r = tokio::time::timeout(Duration::from_secs(8), early).await.expect("served once the table came").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(addr, "/readyz").await.status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_server_reachable_the_gateway_serves_after_the_start_wait() {
    let nobody = format!("127.0.0.1:{}", free_port().unwrap());
    let gw = gateway(following(&nobody, 1)).await;
    let t0 = Instant::now();
    let r = complete(gw.local_addr(), "x", 2, &[]).await;
    let took = t0.elapsed();
    assert_eq!((r.status, r.error_code()), (503, "no_endpoint_table".to_owned()), "{}", r.text());
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(5), "held for the 1 s wait: {took:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stopped_during_its_start_wait_exits_at_once() {
    let nobody = format!("127.0.0.1:{}", free_port().unwrap());
    let gw = gateway(following(&nobody, 600)).await;
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), gw.shutdown()).await.expect("shutdown does not wait out the start");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}
