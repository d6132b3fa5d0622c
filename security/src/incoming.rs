//! The server side: accepted TCP connections become TLS streams before tonic sees them.
//! Handshakes run concurrently (a slow or silent client cannot stall the accept loop) and are
//! bounded by [`HANDSHAKE_TIMEOUT`]; a failed one (no TLS, a foreign CA, an expired
//! certificate) is logged — rate-limited to one line per peer address and minute — and
//! dropped. tonic reads the peer's certificates from the stream
//! (`TlsConnectInfo::peer_certs`), which [`crate::authz`] turns into an identity.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::tls::Tls;

/// How long a client has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream of accepted TLS connections for `Server::serve_with_incoming_shutdown`.
pub type TlsIncoming = tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>>;

/// Accepts on `listener` until the returned stream is dropped.
pub fn incoming(listener: TcpListener, tls: Arc<Tls>) -> TlsIncoming {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut logged: HashMap<std::net::IpAddr, Instant> = HashMap::new();
        let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<(std::net::SocketAddr, String)>();
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some((peer, why)) = fail_rx.recv() => {
                    let now = Instant::now();
                    if logged.get(&peer.ip()).is_none_or(|t| now.duration_since(*t) > Duration::from_secs(60)) {
                        logged.insert(peer.ip(), now);
                        if logged.len() > 4096 {
                            logged.retain(|_, t| now.duration_since(*t) <= Duration::from_secs(60));
                        }
                        tracing::warn!(peer = %peer, error = %why, "TLS handshake refused");
                    }
                    continue;
                }
                () = tx.closed() => break,
            };
            let _ = tcp.set_nodelay(true);
            let (tx, fail_tx) = (tx.clone(), fail_tx.clone());
            let Some(config) = tls.server_config() else {
                tracing::error!("TLS without a certificate cannot serve; give --tls-cert and --tls-key");
                continue;
            };
            let acceptor = TlsAcceptor::from(config);
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        let _ = fail_tx.send((peer, e.to_string()));
                    }
                    Err(_) => {
                        let _ = fail_tx.send((peer, format!("no handshake within {HANDSHAKE_TIMEOUT:?}")));
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
