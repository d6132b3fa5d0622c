//! The agent's HTTP(S) client (hyper 1 + rustls with Mozilla roots) for model downloads.
//! Small helpers with timeouts. Engines are called through `flotilla_engine` instead.
//!
//! With a source policy ([`HttpClient::guarded`]) its resolver connects only to addresses
//! the policy allows: the download path checks a host's addresses before each request
//! (for a clear refusal), and this closes the gap between that lookup and the connector's
//! own (a DNS answer that changes in between, "DNS rebinding").

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use crate::source_policy::Policy;

/// Shared, cheaply clonable HTTP(S) client.
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Client<hyper_rustls::HttpsConnector<HttpConnector<PolicyResolver>>, Empty<Bytes>>,
}

impl HttpClient {
    /// A client for http:// and https:// that connects wherever names resolve.
    pub fn new() -> Result<Self, String> {
        Self::build(None)
    }

    /// A client that connects only to addresses `policy` allows (any address of the
    /// operator's endpoints).
    pub fn guarded(policy: Policy) -> Result<Self, String> {
        Self::build(Some(Arc::new(policy)))
    }

    fn build(policy: Option<Arc<Policy>>) -> Result<Self, String> {
        let mut http = HttpConnector::new_with_resolver(PolicyResolver { gai: GaiResolver::new(), policy });
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("tls setup failed: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https);
        Ok(HttpClient { inner })
    }

    /// Sends a body-less request and returns the response head and streaming body.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        timeout: Duration,
    ) -> Result<Response<Incoming>, String> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let shown = crate::source_policy::url::shown(url);
        let req = req.body(Empty::new()).map_err(|e| format!("bad request for {shown}: {e}"))?;
        match tokio::time::timeout(timeout, self.inner.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(format!("{shown}: {}", error_chain(&e))),
            Err(_) => Err(format!("{shown}: no response within {timeout:?}")),
        }
    }

    /// GET `url` and read the whole body (at most `limit` bytes).
    pub async fn get_text(
        &self,
        url: &str,
        headers: &HeaderMap,
        timeout: Duration,
        limit: usize,
    ) -> Result<(StatusCode, String), String> {
        let resp = self.send(Method::GET, url, headers, timeout).await?;
        let status = resp.status();
        let body = tokio::time::timeout(timeout, read_limited(resp.into_body(), limit))
            .await
            .map_err(|_| format!("{}: body not read within {timeout:?}", crate::source_policy::url::shown(url)))??;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

async fn read_limited(mut body: Incoming, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body read failed: {e}"))?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > limit {
                return Err(format!("body larger than {limit} bytes"));
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out)
}

/// System name resolution, then the source policy's address rule.
#[derive(Clone)]
pub struct PolicyResolver {
    gai: GaiResolver,
    policy: Option<Arc<Policy>>,
}

impl std::fmt::Debug for PolicyResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyResolver").field("guarded", &self.policy.is_some()).finish()
    }
}

type Resolving = Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, ResolveError>> + Send>>;
type ResolveError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Name> for PolicyResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = ResolveError;
    type Future = Resolving;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.gai.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        let resolving = self.gai.call(name);
        let policy = self.policy.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = resolving.await?.collect();
            let Some(policy) = policy.filter(|p| !p.is_endpoint_host(&host)) else {
                return Ok(addrs.into_iter());
            };
            let kept: Vec<SocketAddr> = addrs.into_iter().filter(|a| policy.address_allowed(a.ip())).collect();
            if kept.is_empty() {
                return Err(format!(
                    "{host}: every address it resolves to is refused by the download source policy (rule private_networks)"
                )
                .into());
            }
            Ok(kept.into_iter())
        })
    }
}

/// "outer: inner: root" for an error and its sources.
pub use flotilla_engine::error_chain;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source_policy::Context as PolicyContext;
    use std::str::FromStr;

    #[tokio::test]
    async fn a_guarded_client_connects_only_to_allowed_addresses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").await;
            }
        });
        let url = format!("http://localhost:{port}/");
        let none = HeaderMap::new();
        let t = Duration::from_secs(10);
        let open = HttpClient::new().unwrap();
        assert_eq!(open.send(Method::GET, &url, &none, t).await.unwrap().status(), StatusCode::NO_CONTENT);
        let strict = HttpClient::guarded(Policy::defaults(&PolicyContext::default())).unwrap();
        let err = strict.send(Method::GET, &url, &none, t).await.unwrap_err();
        assert!(err.contains("refused by the download source policy"), "{err}");
        // The operator's endpoints connect wherever they resolve.
        let ctx = PolicyContext {
            endpoints: vec![PolicyContext::endpoint(&format!("http://localhost:{port}")).unwrap()],
            ..PolicyContext::default()
        };
        let endpoint = HttpClient::guarded(Policy::defaults(&ctx)).unwrap();
        assert_eq!(endpoint.send(Method::GET, &url, &none, t).await.unwrap().status(), StatusCode::NO_CONTENT);
        let mut r = PolicyResolver {
            gai: GaiResolver::new(),
            policy: Some(Arc::new(Policy::defaults(&PolicyContext::default()))),
        };
        assert!(r.call(Name::from_str("localhost").unwrap()).await.is_err());
    }
}
