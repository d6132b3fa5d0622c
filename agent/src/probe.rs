//! Engine probes: readiness from `GET /health`, load from `GET /metrics` (vLLM names) and
//! loaded LoRA adapters from `GET /v1/models` (entries whose `parent` is set). Parsers are
//! pure and unit-tested; the fetchers are thin wrappers over [`HttpClient`].

use std::time::Duration;

use http::HeaderMap;

use crate::http::HttpClient;

/// Load scraped from one engine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineLoad {
    /// `vllm:num_requests_running` (summed over label sets).
    pub running: f64,
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc`, in [0,1].
    pub kv_cache_usage: f64,
}

const TIMEOUT: Duration = Duration::from_secs(2);

/// True when `GET http://endpoint/health` answers 200.
pub async fn healthy(client: &HttpClient, endpoint: &str) -> bool {
    let url = format!("http://{endpoint}/health");
    matches!(client.send(http::Method::GET, &url, &HeaderMap::new(), TIMEOUT).await, Ok(r) if r.status().is_success())
}

/// Scrapes `/metrics` and `/v1/models`; None for whatever failed.
pub async fn scrape(client: &HttpClient, endpoint: &str) -> (Option<EngineLoad>, Option<Vec<String>>) {
    let metrics = client.get_text(&format!("http://{endpoint}/metrics"), &HeaderMap::new(), TIMEOUT, 8 << 20).await;
    let load = match metrics {
        Ok((s, body)) if s.is_success() => Some(parse_metrics(&body)),
        _ => None,
    };
    let models = client.get_text(&format!("http://{endpoint}/v1/models"), &HeaderMap::new(), TIMEOUT, 1 << 20).await;
    let adapters = match models {
        Ok((s, body)) if s.is_success() => parse_adapters(&body),
        _ => None,
    };
    (load, adapters)
}

/// Sums the three vLLM gauges over every label set of a Prometheus text exposition.
pub fn parse_metrics(text: &str) -> EngineLoad {
    let mut load = EngineLoad::default();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let slot = match name {
            "vllm:num_requests_running" => &mut load.running,
            "vllm:num_requests_waiting" => &mut load.waiting,
            "vllm:kv_cache_usage_perc" => &mut load.kv_cache_usage,
            _ => continue,
        };
        // The value follows the closing brace (labels may contain spaces) or the name.
        let rest = match line[name_end..].starts_with('{') {
            true => line.rfind('}').map(|i| &line[i + 1..]).unwrap_or(""),
            false => &line[name_end..],
        };
        if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) {
            if v.is_finite() {
                *slot += v;
            }
        }
    }
    load
}

/// The ids of `/v1/models` entries whose `parent` is set (LoRA adapters), or None when
/// the body is not a model list.
pub fn parse_adapters(body: &str) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let data = v.get("data")?.as_array()?;
    Some(
        data.iter()
            .filter(|m| m.get("parent").is_some_and(|p| !p.is_null()))
            .filter_map(|m| m.get("id")?.as_str().map(str::to_string))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_metrics_are_summed_over_labels() {
        let text = "# HELP vllm:num_requests_running Number of requests.\n\
            # TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"tiny\"} 3.0\n\
            vllm:num_requests_running{engine=\"1\",model_name=\"tiny\"} 2.0\n\
            vllm:num_requests_waiting{model_name=\"a b\"} 7\n\
            vllm:kv_cache_usage_perc{engine=\"0\"} 0.25\n\
            vllm:num_requests_waiting_total 99\n\
            vllm:kv_cache_usage_perc_other 5\n";
        assert_eq!(parse_metrics(text), EngineLoad { running: 5.0, waiting: 7.0, kv_cache_usage: 0.25 });
        assert_eq!(parse_metrics("garbage\nvllm:num_requests_running NaN"), EngineLoad::default());
    }

    #[test]
    fn real_vllm_scrape_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/real-vllm/metrics-vllm-0.32.0.txt");
        if let Ok(text) = std::fs::read_to_string(path) {
            let load = parse_metrics(&text);
            assert!(load.kv_cache_usage >= 0.0 && load.kv_cache_usage <= 1.0, "{load:?}");
        }
    }

    #[test]
    fn adapters_are_entries_with_a_parent() {
        let body = r#"{"object":"list","data":[
            {"id":"tiny","object":"model","parent":null,"root":"/m"},
            {"id":"sql-lora","object":"model","parent":"tiny","root":"/a"}]}"#;
        assert_eq!(parse_adapters(body), Some(vec!["sql-lora".to_string()]));
        assert_eq!(parse_adapters("not json"), None);
    }
}
