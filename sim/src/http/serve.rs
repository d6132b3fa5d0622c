//! The sim's accept loop, HTTP/1.1 as vLLM's uvicorn serves it where a client can tell:
//! - `TCP_NODELAY` on every connection (asyncio sets it on each socket). With Nagle on, a
//!   stream's first chunk waited behind the response head for the peer's delayed ACK
//!   (~20–40 ms on a reused connection) and clients saw the time to first token late.
//! - An idle keep-alive connection is closed after `keep_alive` (vLLM:
//!   `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`, 5 s): a client pool that keeps connections longer must
//!   cope with the engine closing them, against the sim as against vLLM. hyper's header-read
//!   timer runs from when a connection starts waiting for its next request, so it is the
//!   idle timeout; it also bounds a slow client's request head, as uvicorn's does.
//! - On stop: no new connections; open ones finish their requests (graceful).

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// vLLM's default `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `stop` turns true, then waits for open requests.
pub async fn serve(listener: TcpListener, app: Router, keep_alive: Duration, mut stop: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // out of file descriptors and the like: back off, keep serving
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(keep_alive)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(tcp), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut stopped => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}
