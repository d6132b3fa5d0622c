//! The API key of the engine the agent starts, on real vLLM. The agent gives each engine a
//! key of its own through `VLLM_API_KEY` (never on the command line), and vLLM's own
//! `AuthenticationMiddleware` then guards its `/v1` API; the key reaches gateways only
//! through the endpoint table the leader streams (`WatchEndpoints`). Checks that call the
//! agent's engine `V` directly read its key with [`engine_key`] and send it with
//! [`post_with_key`] / [`get_with_key`].

use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::json;

use flotilla_testkit::http;
use flotilla_testkit::proc_fs::{args as cmdline, find_process};

use crate::cluster;

/// The entry of the engine at `v` (`host:port`) in the endpoint table of the `tiny` model
/// the leader streams to gateways.
pub async fn endpoint(grpc: &str, v: &str) -> anyhow::Result<flotilla_api::pb::Endpoint> {
    ensure!(!v.is_empty(), "no agent-run engine");
    let mut stream = cluster::watch_endpoints(grpc).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        let set = next.context("no endpoint table naming the engine in 20 s")??.context("the stream ended")?;
        if let Some(e) = set.endpoints.into_iter().find(|e| e.address.ends_with(v)) {
            return Ok(e);
        }
    }
}

/// The key of the engine at `v`, from the endpoint table.
pub async fn engine_key(grpc: &str, v: &str) -> anyhow::Result<String> {
    let e = endpoint(grpc, v).await?;
    ensure!(!e.api_key.is_empty(), "the endpoint table gives no key for {v}");
    Ok(e.api_key)
}

/// `POST path` to the engine with its key.
pub async fn post_with_key(v: &str, path: &str, body: serde_json::Value, key: &str) -> anyhow::Result<http::Resp> {
    let auth = format!("Bearer {key}");
    http::send("POST", v, path, Some(&body), &[("authorization", auth.as_str())]).await
}

/// `GET path` from the engine with its key.
pub async fn get_with_key(v: &str, path: &str, key: &str) -> anyhow::Result<http::Resp> {
    let auth = format!("Bearer {key}");
    http::send("GET", v, path, None, &[("authorization", auth.as_str())]).await
}

/// On the agent's engine `V`: a `/v1` request without the key, or with a wrong one, gets
/// vLLM's 401 `{"error":"Unauthorized"}`; with the key from `WatchEndpoints`, 200.
/// `/health` and `/metrics`, which vLLM leaves open, answer without one, and the key is
/// not on the engine's command line.
pub async fn direct_request_needs_the_engine_key(grpc: &str, v: &str) -> anyhow::Result<()> {
    let key = engine_key(grpc, v).await?;
    ensure!(
        key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
        "a 256-bit hex key, got {} chars",
        key.len()
    );
    let body = json!({"model": "tiny", "prompt": "the key", "max_tokens": 2});
    let none = http::post(v, "/v1/completions", body.clone()).await?;
    ensure!(none.status == 401, "no key: {} {}", none.status, none.text());
    ensure!(none.json()? == json!({"error": "Unauthorized"}), "vLLM's own answer: {}", none.text());
    let wrong = post_with_key(v, "/v1/completions", body.clone(), &"0".repeat(64)).await?;
    ensure!(wrong.status == 401, "a wrong key: {} {}", wrong.status, wrong.text());
    let models = http::get(v, "/v1/models").await?;
    ensure!(models.status == 401, "/v1/models is guarded too: {}", models.status);
    let ok = post_with_key(v, "/v1/completions", body, &key).await?;
    ensure!(ok.status == 200, "with the key: {} {}", ok.status, ok.text());
    ensure!(get_with_key(v, "/v1/models", &key).await?.status == 200, "/v1/models with the key");
    ensure!(http::get(v, "/health").await?.status == 200, "/health needs no key");
    ensure!(http::get(v, "/metrics").await?.status == 200, "/metrics needs no key");
    let port = v.rsplit(':').next().unwrap_or_default().to_string();
    let pid = find_process(&["serve", "--port", &port]).context("the engine process")?;
    let words = cmdline(pid);
    ensure!(!words.iter().any(|w| w.contains(&key)), "the key is on the engine's command line: {words:?}");
    Ok(())
}
