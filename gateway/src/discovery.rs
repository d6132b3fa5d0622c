//! Static endpoints (`--backend MODEL=URL`): the table is the flags; an optional poller
//! reads each engine's `/metrics` (vLLM gauge names) and `/v1/models` (loaded adapters)
//! so load-aware and LoRA-aware routing work without a cluster. A backend that does not
//! answer keeps its last figures; passive ejection handles dead ones.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::config::StaticBackend;
use crate::state::Gateway;
use crate::table::{Endpoint, EndpointSet, EngineLoad};

/// Builds the table from the flags.
pub fn static_set(backends: &[StaticBackend]) -> EndpointSet {
    EndpointSet::from_endpoints(backends.iter().map(|b| Endpoint::new(&b.model, b.authority.clone())))
}

/// Reads vLLM's gauges from a Prometheus text page.
pub fn parse_engine_metrics(text: &str) -> EngineLoad {
    let mut l = EngineLoad::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name_labels, value)) = line.rsplit_once(' ') else { continue };
        let Ok(v) = value.trim().parse::<f64>() else { continue };
        let name = name_labels.split('{').next().unwrap_or("");
        match name {
            "vllm:num_requests_running" => l.running += v,
            "vllm:num_requests_waiting" => l.waiting += v,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => l.kv_cache_usage = l.kv_cache_usage.max(v),
            _ => {}
        }
    }
    l
}

/// Adapters listed by an engine's `/v1/models` (entries with a `parent`).
pub fn parse_adapters(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return Vec::new() };
    v["data"]
        .as_array()
        .map(|a| {
            a.iter().filter(|m| m["parent"].is_string()).filter_map(|m| m["id"].as_str().map(str::to_string)).collect()
        })
        .unwrap_or_default()
}

async fn get(gw: &Gateway, authority: &str, path: &str) -> Option<Bytes> {
    let req = http::Request::get(format!("http://{authority}{path}")).body(Full::new(Bytes::new())).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(2), gw.client.request(req)).await.ok()?.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    Some(tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect()).await.ok()?.ok()?.to_bytes())
}

/// Polls every static backend forever.
pub async fn scrape_loop(gw: Arc<Gateway>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let current = gw.dir.endpoints();
        let mut next = Vec::new();
        for eps in current.by_model.values() {
            for e in eps {
                let mut e = Endpoint::clone(e);
                let a = e.authority.to_string();
                let (m, models) = tokio::join!(get(&gw, &a, "/metrics"), get(&gw, &a, "/v1/models"));
                if let Some(m) = m {
                    e.engine = parse_engine_metrics(&String::from_utf8_lossy(&m));
                }
                if let Some(models) = models {
                    e.adapters = parse_adapters(&models);
                }
                next.push(e);
            }
        }
        gw.dir.set_endpoints(EndpointSet::from_endpoints(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_gauges_and_adapters_parse() {
        let text = "# HELP x\nvllm:num_requests_running{model_name=\"m\"} 3\nvllm:num_requests_waiting{model_name=\"m\"} 7\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\nother 1\n";
        assert_eq!(parse_engine_metrics(text), EngineLoad { running: 3.0, waiting: 7.0, kv_cache_usage: 0.25 });
        let body = br#"{"data":[{"id":"base","parent":null},{"id":"sql","parent":"base"}]}"#;
        assert_eq!(parse_adapters(body), ["sql"]);
    }
}
