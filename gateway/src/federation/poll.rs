//! One poller per member: `GET /v1/models` on its gateway (with `--member-key-file`'s key)
//! every `--member-poll-interval-ms` while it is up, and after its backoff while it is down
//! (a probe). An answer makes it up and sets its models and a latency sample; a refused
//! connection, a timeout, a non-200 answer or a body that is not a model list makes it down.
//! A request that marks the member down wakes the poller, which then probes after the
//! backoff.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;

use super::members::Member;
use super::metrics::{ClusterLabels, PollLabels};
use super::Federation;

/// Largest `/v1/models` answer read.
pub const MAX_MODELS_BODY: usize = 4 << 20;

/// The model ids of an OpenAI `/v1/models` answer (pure).
pub fn model_ids(body: &[u8]) -> Result<BTreeSet<String>, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let data = v.get("data").and_then(serde_json::Value::as_array).ok_or("no \"data\" list")?;
    Ok(data.iter().filter_map(|m| m.get("id")?.as_str().map(str::to_string)).collect())
}

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
enum PollError {
    /// No answer: refused, reset, timed out.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// An answer that is not a model list.
    #[error("bad answer: {0}")]
    Answer(String),
}

async fn poll_once(fed: &Federation, m: &Member) -> Result<BTreeSet<String>, PollError> {
    let uri = m.info.gateway.uri("/v1/models").map_err(|e| PollError::Answer(e.to_string()))?;
    let mut b = Request::get(uri);
    if let Some(key) = &fed.cfg.member_key {
        b = b.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let req = b.body(Full::new(Bytes::new())).map_err(|e| PollError::Answer(e.to_string()))?;
    let fetch = async {
        let resp = fed.client.request(req).await.map_err(|e| PollError::Unreachable(super::proxy::error_chain(&e)))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_MODELS_BODY)
            .collect()
            .await
            .map_err(|e| PollError::Unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            let hint = if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                " (give --member-key-file the key of a tenant of every member)"
            } else {
                ""
            };
            return Err(PollError::Answer(format!("status {status}{hint}")));
        }
        model_ids(&body).map_err(PollError::Answer)
    };
    match tokio::time::timeout(fed.cfg.poll_timeout, fetch).await {
        Err(_) => Err(PollError::Unreachable(format!("no answer within {} ms", fed.cfg.poll_timeout.as_millis()))),
        Ok(r) => r,
    }
}

/// Polls `m` until it leaves the table (the task is aborted) or the gateway stops.
pub async fn run(fed: Weak<Federation>, m: Arc<Member>) {
    let labels = ClusterLabels { cluster: m.info.name.to_string() };
    let mut was_up = None;
    loop {
        let Some(f) = fed.upgrade() else { return };
        let t0 = Instant::now();
        let result = poll_once(&f, &m).await;
        let ok = result.is_ok();
        match result {
            Ok(models) => m.poll_ok(models, t0.elapsed()),
            Err(e) => {
                m.poll_failed(Instant::now(), f.cfg.down_backoff);
                if was_up != Some(false) {
                    tracing::warn!(cluster = %m.info.name, gateway = %m.info.gateway, error = %e, "member down");
                }
            }
        }
        if ok && was_up != Some(true) {
            tracing::info!(cluster = %m.info.name, models = ?m.models(), "member up");
        }
        was_up = Some(ok);
        let result = if ok { "ok" } else { "error" };
        f.metrics
            .member_polls
            .get_or_create(&PollLabels { cluster: labels.cluster.clone(), result: result.into() })
            .inc();
        f.metrics.member_up.get_or_create(&labels).set(i64::from(m.is_up()));
        if let Some(ms) = m.ewma_ms() {
            f.metrics.member_latency.get_or_create(&labels).set(ms / 1e3);
        }
        let interval = f.cfg.poll_interval;
        drop(f);
        let wait = m.health().next_poll_in(Instant::now(), interval);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = m.wake.notified() => {
                // a request marked it down: probe after the backoff
                let Some(f) = fed.upgrade() else { return };
                f.metrics.member_up.get_or_create(&labels).set(i64::from(m.is_up()));
                drop(f);
                tokio::time::sleep(m.health().next_poll_in(Instant::now(), interval)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_lists_are_read_leniently() {
        let body =
            br#"{"object":"list","data":[{"id":"llama","object":"model"},{"id":"sql-lora","parent":"llama"},{"x":1}]}"#;
        let ids = model_ids(body).unwrap();
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), ["llama", "sql-lora"]);
        assert!(model_ids(b"{}").unwrap_err().contains("data"));
        assert!(model_ids(b"<html>").unwrap_err().contains("not JSON"));
    }
}
