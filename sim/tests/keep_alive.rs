//! HTTP keep-alive as vLLM's uvicorn has it: a connection is reused for the next request,
//! and one left idle is closed by the engine after `VLLM_HTTP_TIMEOUT_KEEP_ALIVE` (5 s) — so
//! a client pool that keeps idle connections longer meets closed connections on the sim as
//! on vLLM (flotilla's own clients reuse them for at most `ENGINE_IDLE_REUSE`, 4 s).

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant};

/// Sends `GET /health` on `s` and reads until its (empty-bodied or small) answer arrived.
async fn health(s: &mut TcpStream) -> String {
    s.write_all(b"GET /health HTTP/1.1\r\nHost: sim\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("an answer").unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_reused_then_closed_after_the_keep_alive() {
    let sim = start(args()).await;
    let mut s = TcpStream::connect(sim.local_addr()).await.unwrap();
    assert!(health(&mut s).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(health(&mut s).await.starts_with("HTTP/1.1 200"), "reused after 1 s idle");
    let idle_from = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("closed within 10 s").unwrap();
    let idle = idle_from.elapsed();
    assert_eq!(n, 0, "the server closed the connection");
    assert!(
        idle >= Duration::from_millis(4500) && idle <= Duration::from_secs(7),
        "closed after {idle:?} idle, vLLM's keep-alive is 5 s"
    );
    sim.shutdown().await.unwrap();
}
