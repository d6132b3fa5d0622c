//! Engine probes for the engine tasks: readiness from `GET /health`, and the load and
//! adapter list of an engine from `GET /metrics` and `GET /v1/models`.
//! The HTTP calls and the parsing (metric name table, `/v1/models`) live in
//! [`flotilla_engine`], shared with the gateway; this module only decides what a scrape
//! writes into the report. The adapter list goes to the engine's adapter worker, which
//! merges it with its own load results and writes `loaded_adapters`.

use flotilla_api::pb::EngineReport;
use flotilla_engine::{EngineClient, EngineMetrics};

/// True when `GET http://endpoint/health` answers 2xx within the client's timeout.
pub async fn healthy(client: &EngineClient, endpoint: &str) -> bool {
    client.health(endpoint).await
}

/// One scrape of an engine; None for whatever failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// Standardized `/metrics`.
    pub metrics: Option<EngineMetrics>,
    /// Ids of the `/v1/models` entries whose `parent` is set (LoRA adapters).
    pub adapters: Option<Vec<String>>,
}

/// Reads `/metrics` and `/v1/models` concurrently.
pub async fn scrape(client: &EngineClient, endpoint: &str) -> Scrape {
    let (metrics, models) = tokio::join!(client.metrics(endpoint), client.models(endpoint));
    let metrics = metrics
        .inspect_err(|e| tracing::debug!(endpoint, error = %e, code = e.code(), "engine /metrics scrape failed"))
        .ok();
    let adapters = models
        .inspect_err(|e| tracing::debug!(endpoint, error = %e, code = e.code(), "engine /v1/models scrape failed"))
        .ok()
        .map(|cards| flotilla_engine::adapters(&cards));
    Scrape { metrics, adapters }
}

/// Writes a scrape's load into the report (not its adapters: see the module doc). A failed
/// scrape keeps the last figures, and so does one of an engine whose `/metrics` has none
/// of the known names (unknown is not idle).
pub fn apply(scrape: &Scrape, report: &mut EngineReport) {
    if let Some(m) = scrape.metrics.as_ref().filter(|m| m.is_known()) {
        report.num_requests_running = m.running;
        report.num_requests_waiting = m.waiting;
        report.kv_cache_usage = m.kv_cache_usage;
        report.generation_tokens_total = m.generation_tokens;
        report.prompt_tokens_total = m.prompt_tokens;
        report.requests_finished_total = m.requests_finished;
        report.metrics_known = true;
        // Adapters with requests in the engine (never evicted by the leader meanwhile).
        let mut active: Vec<String> =
            m.lora.iter().flat_map(|l| l.running.iter().chain(&l.waiting)).filter(|n| !n.is_empty()).cloned().collect();
        active.sort();
        active.dedup();
        report.active_adapters = active;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(running: f64) -> EngineReport {
        EngineReport {
            num_requests_running: running,
            num_requests_waiting: 1.0,
            kv_cache_usage: 0.5,
            loaded_adapters: vec!["old".into()],
            ..EngineReport::default()
        }
    }

    #[test]
    fn a_scrape_fills_load_but_not_adapters() {
        let text = "vllm:num_requests_running{engine=\"0\"} 3\nvllm:num_requests_running{engine=\"1\"} 2\n\
            vllm:num_requests_waiting 7\nvllm:kv_cache_usage_perc{engine=\"0\"} 0.25\n";
        let scrape = Scrape { metrics: Some(EngineMetrics::parse(text)), adapters: Some(vec!["sql".into()]) };
        let mut r = loaded(9.0);
        apply(&scrape, &mut r);
        assert_eq!((r.num_requests_running, r.num_requests_waiting, r.kv_cache_usage), (5.0, 7.0, 0.25));
        assert_eq!(r.loaded_adapters, ["old"], "the adapter worker owns loaded_adapters");
        assert!(r.active_adapters.is_empty(), "no vllm:lora_requests_info, no active adapters");
        let text = "vllm:num_requests_running 1\n\
            vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"b,a\",waiting_lora_adapters=\"c,a\"} 1.7e9\n";
        let scrape = Scrape { metrics: Some(EngineMetrics::parse(text)), adapters: None };
        apply(&scrape, &mut r);
        assert_eq!(r.active_adapters, ["a", "b", "c"], "running and waiting, once each");
    }

    #[test]
    fn failed_or_unknown_scrapes_keep_the_last_figures() {
        let mut r = loaded(4.0);
        assert!(!r.metrics_known);
        apply(&Scrape::default(), &mut r);
        assert_eq!(r, loaded(4.0));
        let unknown = Scrape { metrics: Some(EngineMetrics::parse("process_cpu_seconds_total 1\n")), adapters: None };
        apply(&unknown, &mut r);
        assert_eq!(r, loaded(4.0));
        let idle = Scrape { metrics: Some(EngineMetrics::parse("vllm:num_requests_running 0\n")), adapters: None };
        apply(&idle, &mut r);
        assert_eq!((r.num_requests_running, r.num_requests_waiting, r.kv_cache_usage), (0.0, 0.0, 0.0));
        assert!(r.metrics_known, "a known scrape marks the figures known (idle is not unknown)");
    }
}
