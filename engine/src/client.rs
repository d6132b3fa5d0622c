//! [`EngineClient`]: the HTTP calls flotilla makes to one engine (`host:port` on the node
//! network): `/health`, `/metrics`, `/v1/models` and LoRA load/unload. Each call runs under
//! one timeout covering connect, answer and body, and reads at most `max_body_bytes`.
//! Connections are pooled per engine (kept alive, one TLS handshake per connection); clones
//! share the pool and the client's [`EnginePins`].
//!
//! A client made with [`EngineClient::with_key`] sends `Authorization: Bearer KEY` on the
//! calls whose path the engine guards (`/v1/...`: models, LoRA), not on `/health` and
//! `/metrics`, which vLLM leaves open. One made [`EngineClient::with_tls`] calls `https://`,
//! and the engine must show a certificate pinned for its host in [`EngineClient::pins`]
//! (`crate::tls`); otherwise the call fails with [`EngineError::CertificateMismatch`] before
//! any request is sent.
//!
//! Non-2xx answers become [`EngineError::Http`] with the engine's message; real vLLM
//! answers a LoRA load with 200 and plain text (`Success: LoRA adapter 'x' added
//! successfully.`), a name loaded twice with 400, a bad path with 404, and LoRA disabled
//! with 500.

use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::error::{engine_message, EngineError};
use crate::key::{guarded, EngineKey};
use crate::metrics::EngineMetrics;
use crate::models::{parse_models, ModelCard};
use crate::pins::EnginePins;
use crate::tls::{connector, pin_mismatch, PinnedConnector};

/// Limits of an [`EngineClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineClientConfig {
    /// Whole-call limit for `/health`, `/metrics` and `/v1/models` (connect, answer, body).
    pub timeout: Duration,
    /// Whole-call limit for LoRA load and unload (the engine reads the adapter's weights).
    pub lora_timeout: Duration,
    /// Largest body read, in bytes; larger answers fail with [`EngineError::BodyTooLarge`].
    pub max_body_bytes: usize,
}

impl Default for EngineClientConfig {
    /// 2 s per probe, 60 s per LoRA call, 8 MiB bodies.
    fn default() -> Self {
        EngineClientConfig {
            timeout: Duration::from_secs(2),
            lora_timeout: Duration::from_secs(60),
            max_body_bytes: 8 << 20,
        }
    }
}

/// Talks to engines; cheap to clone (clones share one connection pool).
#[derive(Clone, Debug)]
pub struct EngineClient {
    http: Client<PinnedConnector, Full<Bytes>>,
    cfg: EngineClientConfig,
    /// Sent on guarded paths; None: no `Authorization` header.
    key: Option<EngineKey>,
    /// The certificates `https` engines may show (shared by clones).
    pins: EnginePins,
    /// Call `https://` (the engine serves TLS with a pinned certificate).
    tls: bool,
}

impl Default for EngineClient {
    fn default() -> Self {
        EngineClient::new()
    }
}

/// How long an idle pooled connection to an engine may be reused: below vLLM's keep-alive
/// (`VLLM_HTTP_TIMEOUT_KEEP_ALIVE`, 5 s; the sim closes idle connections as vLLM does), so a
/// client never sends a request on a connection the engine is closing at that moment.
pub const ENGINE_IDLE_REUSE: Duration = Duration::from_secs(4);

impl EngineClient {
    /// A client with [`EngineClientConfig::default`] limits.
    pub fn new() -> Self {
        EngineClient::with_config(EngineClientConfig::default())
    }

    /// A client with the given limits and an empty pin set.
    pub fn with_config(cfg: EngineClientConfig) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(cfg.timeout));
        let pins = EnginePins::new();
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(ENGINE_IDLE_REUSE)
            .build(connector(conn, &pins));
        EngineClient { http, cfg, key: None, pins, tls: false }
    }

    /// A client for one engine that requires `key` (None: one that requires none), sharing
    /// this client's connection pool and limits.
    pub fn with_key(&self, key: Option<EngineKey>) -> EngineClient {
        EngineClient { key, ..self.clone() }
    }

    /// A client for one engine that serves TLS (`tls`: calls go to `https://`, and the
    /// engine's certificate must be pinned for its host in [`Self::pins`]) or plain HTTP,
    /// sharing this client's pool, pins, key and limits.
    pub fn with_tls(&self, tls: bool) -> EngineClient {
        EngineClient { tls, ..self.clone() }
    }

    /// The certificates this client (and its clones) accept from `https` engines.
    pub fn pins(&self) -> &EnginePins {
        &self.pins
    }

    /// The limits.
    pub fn config(&self) -> &EngineClientConfig {
        &self.cfg
    }

    /// True when `GET /health` answers 2xx within the timeout.
    pub async fn health(&self, endpoint: &str) -> bool {
        match self.call(Method::GET, endpoint, "/health", None, self.cfg.timeout).await {
            Ok(_) => true,
            Err(e) => {
                tracing::trace!(endpoint, error = %e, "engine health probe failed");
                false
            }
        }
    }

    /// `GET /metrics`, standardized (see [`crate::metrics`]).
    pub async fn metrics(&self, endpoint: &str) -> Result<EngineMetrics, EngineError> {
        let body = self.call(Method::GET, endpoint, "/metrics", None, self.cfg.timeout).await?;
        Ok(EngineMetrics::parse(&String::from_utf8_lossy(&body)))
    }

    /// `GET /kv_event_sources`: where the engine publishes its KV cache events (rank 0's
    /// publisher), or None when it publishes none.
    pub async fn kv_event_sources(&self, endpoint: &str) -> Result<Option<crate::kv_events::Sources>, EngineError> {
        let body = self.call(Method::GET, endpoint, "/kv_event_sources", None, self.cfg.timeout).await?;
        crate::kv_events::Sources::parse(&body)
            .map_err(|reason| EngineError::InvalidBody { url: url(self.tls, endpoint, "/kv_event_sources"), reason })
    }

    /// `GET /v1/models`: the base model and loaded adapters.
    pub async fn models(&self, endpoint: &str) -> Result<Vec<ModelCard>, EngineError> {
        let body = self.call(Method::GET, endpoint, "/v1/models", None, self.cfg.timeout).await?;
        parse_models(&body).map_err(|e| match e {
            EngineError::InvalidBody { reason, .. } => {
                EngineError::InvalidBody { url: url(self.tls, endpoint, "/v1/models"), reason }
            }
            other => other,
        })
    }

    /// `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}`.
    pub async fn load_lora(&self, endpoint: &str, name: &str, path: &str) -> Result<(), EngineError> {
        let body = serde_json::json!({"lora_name": name, "lora_path": path});
        self.call(Method::POST, endpoint, "/v1/load_lora_adapter", Some(body), self.cfg.lora_timeout).await?;
        tracing::debug!(endpoint, adapter = name, path, "lora adapter loaded");
        Ok(())
    }

    /// `POST /v1/unload_lora_adapter` `{"lora_name"}`.
    pub async fn unload_lora(&self, endpoint: &str, name: &str) -> Result<(), EngineError> {
        let body = serde_json::json!({"lora_name": name});
        self.call(Method::POST, endpoint, "/v1/unload_lora_adapter", Some(body), self.cfg.lora_timeout).await?;
        tracing::debug!(endpoint, adapter = name, "lora adapter unloaded");
        Ok(())
    }

    /// One request; the 2xx body, or the error.
    async fn call(
        &self,
        method: Method,
        endpoint: &str,
        path: &str,
        json: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<Bytes, EngineError> {
        let invalid = |reason: String| EngineError::InvalidEndpoint { endpoint: endpoint.to_string(), reason };
        let authority: Authority = endpoint.parse().map_err(|e| invalid(format!("{e}")))?;
        if authority.port_u16().is_none() {
            return Err(invalid("expected host:port".to_string()));
        }
        let url = url(self.tls, authority.as_str(), path);
        let mut req = Request::builder().method(method).uri(&url).header(header::HOST, authority.as_str());
        if let Some(key) = self.key.as_ref().filter(|_| guarded(path)) {
            req = req.header(header::AUTHORIZATION, key.bearer());
        }
        let body = match json {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body)).map_err(|e| invalid(e.to_string()))?;
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| match pin_mismatch(&e) {
                Some(m) => EngineError::CertificateMismatch { url: url.clone(), reason: m.to_string() },
                None => EngineError::Unreachable { url: url.clone(), reason: error_chain(&e) },
            })?;
            let status = resp.status();
            let body = read_limited(resp.into_body(), self.cfg.max_body_bytes, &url).await;
            if status.is_success() {
                return body;
            }
            // An error answer whose body cannot be read still carries its status.
            let message = match body.map(|b| engine_message(&b)) {
                Ok(m) if !m.is_empty() => m,
                _ => status.canonical_reason().unwrap_or("").to_string(),
            };
            Err(http_error(&url, status, message))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Timeout { url, after: timeout }),
        }
    }
}

fn url(tls: bool, authority: &str, path: &str) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{authority}{path}")
}

fn http_error(url: &str, status: StatusCode, message: String) -> EngineError {
    EngineError::Http { url: url.to_string(), status: status.as_u16(), message }
}

async fn read_limited(mut body: Incoming, limit: usize, url: &str) -> Result<Bytes, EngineError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| EngineError::Unreachable { url: url.to_string(), reason: error_chain(&e) })?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > limit {
                return Err(EngineError::BodyTooLarge { url: url.to_string(), limit });
            }
            out.extend_from_slice(data);
        }
    }
    Ok(Bytes::from(out))
}

/// "outer: inner: root" for an error and its sources, without repeats (hyper's errors say
/// little until their sources are read). Shared with the agent's download client.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let text = src.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_endpoints_fail_before_any_io() {
        let c = EngineClient::new();
        for bad in ["", "host", "host:port", "a b:1", "http://h:1"] {
            let e = c.metrics(bad).await.expect_err(bad);
            assert_eq!(e.code(), "engine.invalid_endpoint", "{bad}: {e}");
        }
        assert!(!c.health("").await);
    }
}
