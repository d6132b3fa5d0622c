//! A small HTTP/1 client over hyper: JSON requests to engines and gateways, whole responses
//! with their raw bodies kept (for shape comparison), SSE payloads, and a health wait.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// How long one request may take, answer included.
pub const LIMIT: Duration = Duration::from_secs(120);

/// A response, body read in full.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| anyhow::anyhow!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    /// The `data:` payloads of a server-sent-event body.
    pub fn sse(&self) -> Vec<String> {
        sse_data(&self.text())
    }
}

/// The `data:` payloads of a server-sent-event stream, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d).to_string()).collect()
}

/// `method http://authority/path` with an optional JSON body and extra headers, bounded by
/// [`LIMIT`].
pub async fn send(
    method: &str,
    authority: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    headers: &[(&str, &str)],
) -> anyhow::Result<Resp> {
    let mut all = Vec::with_capacity(headers.len() + 1);
    if body.is_some() {
        all.push(("content-type", "application/json"));
    }
    all.extend_from_slice(headers);
    let bytes = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    send_bytes(method, authority, path, bytes, &all).await
}

/// `method http://authority/path` with these exact body bytes (malformed ones included) and
/// headers, bounded by [`LIMIT`].
pub async fn send_bytes(
    method: &str,
    authority: &str,
    path: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> anyhow::Result<Resp> {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut b = http::Request::builder().method(method).uri(format!("http://{authority}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body))?;
    let fut = async {
        let resp = client.request(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok(Resp { status, headers, body })
    };
    tokio::time::timeout(LIMIT, fut).await.map_err(|_| anyhow::anyhow!("{method} {authority}{path} timed out"))?
}

pub async fn post(authority: &str, path: &str, body: serde_json::Value) -> anyhow::Result<Resp> {
    send("POST", authority, path, Some(&body), &[]).await
}

pub async fn get(authority: &str, path: &str) -> anyhow::Result<Resp> {
    send("GET", authority, path, None, &[]).await
}

/// Polls `GET /health` until 200 or `timeout`; how long it took.
pub async fn wait_healthy(authority: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let t0 = tokio::time::Instant::now();
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), get(authority, "/health")).await {
            if r.status == 200 {
                return Ok(t0.elapsed());
            }
        }
        anyhow::ensure!(t0.elapsed() < timeout, "{authority} not healthy after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_payloads_in_order() {
        let table: &[(&str, &[&str])] = &[
            ("data: {\"a\":1}\n\ndata: [DONE]\n\n", &["{\"a\":1}", "[DONE]"]),
            ("event: x\ndata:no-space\n: comment\n", &["no-space"]),
            ("data:  two spaces\n", &[" two spaces"]),
            ("", &[]),
        ];
        for (body, want) in table {
            assert_eq!(sse_data(body), *want, "{body:?}");
        }
    }

    #[tokio::test]
    async fn a_request_to_nobody_is_an_error() {
        let port = crate::ports::free_port().expect("port");
        assert!(get(&format!("127.0.0.1:{port}"), "/health").await.is_err());
    }
}
