//! gRPC channels over TLS: tonic dials through a connector that opens the TCP connection to
//! the (possibly `FLOTILLA_DIAL_MAP`-rewritten) address and runs the TLS handshake with the
//! current client configuration ([`Tls::client_config`]), verifying the server's certificate
//! against the *configured* address — the name the server's certificate carries, not a
//! proxy's. URIs stay `http://`: TLS is below tonic, not configured in it.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::tls::Tls;

/// The host part of `addr` (`host:port`, `http://host:port`, `[v6]:port`).
pub fn host_of(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => rest.rsplit_once(':').map_or(rest, |(h, _)| h),
    }
}

fn connector(
    tls: Arc<Tls>,
    server: String,
) -> impl tower::Service<
    http::Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(move |uri: http::Uri| {
        let (tls, server) = (tls.clone(), server.clone());
        async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(server.clone()).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{server:?} is not a server name: {e}"))
            })?;
            let stream = TlsConnector::from(tls.client_config()).connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        }
    })
}

/// A channel to `configured` (the address as given, whose name or IP the server's
/// certificate must carry) through `endpoint` (built from the address actually dialled);
/// plain when `tls` is None. Connects on first use.
pub fn connect_lazy(endpoint: Endpoint, tls: Option<&Arc<Tls>>, configured: &str) -> Channel {
    match tls {
        None => endpoint.connect_lazy(),
        Some(tls) => endpoint.connect_with_connector_lazy(connector(tls.clone(), host_of(configured).to_string())),
    }
}

/// [`connect_lazy`], connecting now.
pub async fn connect(
    endpoint: Endpoint,
    tls: Option<&Arc<Tls>>,
    configured: &str,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        None => endpoint.connect().await,
        Some(tls) => endpoint.connect_with_connector(connector(tls.clone(), host_of(configured).to_string())).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_cut_out_of_addresses() {
        for (addr, host) in [
            ("127.0.0.1:7070", "127.0.0.1"),
            ("http://s1.example:7070", "s1.example"),
            ("https://[::1]:7070/", "::1"),
            ("[fe80::1]:1", "fe80::1"),
            ("localhost", "localhost"),
        ] {
            assert_eq!(host_of(addr), host, "{addr}");
        }
    }
}
