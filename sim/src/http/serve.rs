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
//! - hyper copies what it writes into its own buffer and hands the socket one slice
//!   (`writev(false)`), not a vectored write of chunk size, data and CRLF: a streamed token
//!   is one ~250-byte chunk per write, and the copy costs less than the queue of pieces
//!   (~230 fewer instructions per streamed token, callgrind). The bytes sent are the same.
//! - With `--ssl-certfile`/`--ssl-keyfile` ([`https`]), every connection is TLS, as uvicorn's
//!   with vLLM's `--ssl-*` flags: the handshake runs in the connection's own task (at most
//!   10 s), and a client that fails it (one speaking plain HTTP, or refusing the
//!   certificate) is closed without an answer, logged at debug.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use flotilla_security::https::HttpsCert;
use flotilla_security::TlsError;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::SimError;

/// vLLM's default `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The TLS certificate of `--ssl-certfile` and `--ssl-keyfile`; an error names the flag of
/// the file at fault (a usage error: exit code 2).
pub fn https(cert: &Path, key: &Path) -> Result<Arc<HttpsCert>, SimError> {
    HttpsCert::load(cert.to_path_buf(), key.to_path_buf()).map_err(|e| {
        let flag = match &e {
            TlsError::Read { path, .. } | TlsError::Empty { path, .. } if Path::new(path) == cert => "ssl-certfile",
            _ => "ssl-keyfile",
        };
        SimError::invalid(flag, e.to_string())
    })
}

/// Serves `app` on `listener` (over TLS with `tls`) until `stop` turns true, then waits for
/// open requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    keep_alive: Duration,
    tls: Option<Arc<HttpsCert>>,
    mut stop: watch::Receiver<bool>,
) {
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
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new()).header_read_timeout(keep_alive).keep_alive(true).writev(false);
                let watcher = graceful.watcher();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let ended = match tls {
                        None => watcher.watch(http.serve_connection(TokioIo::new(tcp), svc)).await,
                        Some(cert) => match cert.accept(tcp).await {
                            Ok(stream) => watcher.watch(http.serve_connection(TokioIo::new(stream), svc)).await,
                            Err(e) => {
                                tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                                return;
                            }
                        },
                    };
                    if let Err(e) = ended {
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
