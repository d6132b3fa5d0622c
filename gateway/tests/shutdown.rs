//! Stopping a gateway (SIGTERM, an upgrade): it stops accepting connections at once and lets
//! the requests in flight finish — a stream that started before the stop ends with its
//! `[DONE]` — within `--shutdown-grace-s`, past which the rest are closed.

mod common;

use std::time::Duration;

use common::*;
use tokio::time::Instant;

/// A streamed completion of `max_tokens` tokens through the gateway at `addr`.
async fn stream(addr: std::net::SocketAddr, max_tokens: u32) -> Resp {
    let body =
        serde_json::json!({"model": MODEL, "prompt": "tell me a story", "max_tokens": max_tokens, "stream": true});
    post(addr, "/v1/completions", body, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_flight_finishes_and_new_connections_are_refused() {
    // speedup 0.2: 200 tokens take a few seconds on the a100 profile.
    let sims = sims(1, 0.2).await;
    let gw = gateway(gw_args(&sims)).await;
    let addr = gw.local_addr();
    let started = Instant::now();
    let in_flight = tokio::spawn(stream(addr, 200));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = tokio::spawn(gw.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed at once");
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.sse().last().map(String::as_str), Some("[DONE]"), "the stream ran to its end");
    assert!(started.elapsed() > Duration::from_secs(1), "it was in flight across the stop");
    tokio::time::timeout(Duration::from_secs(10), stopping).await.expect("shutdown returns once drained").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_grace_are_closed() {
    let sims = sims(1, 0.05).await; // far slower than real time: the stream outlives the grace
    let gw = gateway(flotilla_gateway::GatewayArgs { shutdown_grace_s: 1, ..gw_args(&sims) }).await;
    let addr = gw.local_addr();
    let in_flight = tokio::spawn(stream(addr, 500));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    gw.shutdown().await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "stopped after the 1 s grace: {took:?}"
    );
    // The client sees its connection end mid-body (the helper panics on that) or, at the
    // least, no `[DONE]`.
    match tokio::time::timeout(Duration::from_secs(10), in_flight).await.expect("the client sees the end") {
        Err(e) => assert!(e.is_panic(), "{e}"),
        Ok(r) => assert_ne!(r.sse().last().map(String::as_str), Some("[DONE]"), "cut before its end"),
    }
}
