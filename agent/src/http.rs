//! The agent's HTTP(S) client (hyper 1 + rustls with Mozilla roots) for model downloads.
//! Small helpers with timeouts. Engines are called through `flotilla_engine` instead.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Shared, cheaply clonable HTTP(S) client.
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl HttpClient {
    /// A client for http:// and https://.
    pub fn new() -> Result<Self, String> {
        let mut http = HttpConnector::new();
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

/// "outer: inner: root" for an error and its sources.
pub use flotilla_engine::error_chain;
