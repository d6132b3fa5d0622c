//! Static endpoints (`--backend MODEL=URL`): the table is the flags; an optional poller
//! reads each engine's `/metrics` and `/v1/models` through `flotilla_engine::EngineClient`
//! (the client and metric name table the agents use too: vLLM V1, older vLLM and SGLang
//! names) so load-aware and LoRA-aware routing work without a cluster. A backend that does
//! not answer, or whose `/metrics` has none of the known names, keeps its last figures;
//! passive ejection handles dead ones.

use std::sync::Arc;
use std::time::Duration;

use flotilla_engine::EngineClient;

use crate::config::StaticBackend;
use crate::names::AdapterName;
use crate::state::Gateway;
use crate::table::{Endpoint, EndpointSet, EngineLoad};

/// Builds the table from the flags.
pub fn static_set(backends: &[StaticBackend]) -> EndpointSet {
    EndpointSet::from_endpoints(backends.iter().map(|b| {
        let mut e = Endpoint::new(b.model.clone(), b.authority.clone());
        e.api_key = b.api_key.clone();
        e
    }))
}

/// Applies one scrape of `e`'s engine: figures that could not be read stay as they were.
async fn refresh(client: &EngineClient, e: &mut Endpoint) {
    let a = e.authority.as_str();
    let (metrics, models) = tokio::join!(client.metrics(a), client.models(a));
    match metrics {
        Ok(m) if m.is_known() => e.engine = EngineLoad::from(&m),
        Ok(_) => tracing::debug!(endpoint = %e.id, "engine /metrics has no known load metric"),
        Err(err) => tracing::debug!(endpoint = %e.id, error = %err, code = err.code(), "engine /metrics scrape failed"),
    }
    match models {
        Ok(cards) => e.adapters = flotilla_engine::adapters(&cards).into_iter().map(AdapterName::from).collect(),
        Err(err) => {
            tracing::debug!(endpoint = %e.id, error = %err, code = err.code(), "engine /v1/models scrape failed")
        }
    }
}

/// Polls every static backend forever.
pub async fn scrape_loop(gw: Arc<Gateway>, interval: Duration) {
    let client = EngineClient::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let current = gw.dir.endpoints();
        let mut next = Vec::new();
        for eps in current.by_model.values() {
            for e in eps {
                let mut e = Endpoint::clone(e);
                refresh(&client.with_key(e.api_key.clone()), &mut e).await;
                next.push(e);
            }
        }
        gw.dir.set_endpoints(EndpointSet::from_endpoints(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_engine::EngineMetrics;

    #[test]
    fn engine_metrics_become_routing_load() {
        let text =
            "# HELP x\nvllm:num_requests_running{model_name=\"m\"} 3\nvllm:num_requests_waiting{model_name=\"m\"} 7\n\
            vllm:kv_cache_usage_perc{engine=\"0\"} 0.25\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.5\nother 1\n";
        let load = EngineLoad::from(&EngineMetrics::parse(text));
        assert_eq!(load, EngineLoad { running: 3.0, waiting: 7.0, kv_cache_usage: 0.5 });
        let legacy = EngineLoad::from(&EngineMetrics::parse("vllm:gpu_cache_usage_perc 0.75\n"));
        assert_eq!(legacy.kv_cache_usage, 0.75);
    }

    #[tokio::test]
    async fn an_unreachable_backend_keeps_its_last_figures() {
        let port = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let mut e = Endpoint::new("m", format!("127.0.0.1:{port}").parse().unwrap());
        e.engine = EngineLoad { running: 2.0, waiting: 1.0, kv_cache_usage: 0.5 };
        e.adapters = vec!["sql".into()];
        let before = e.clone();
        refresh(&EngineClient::new(), &mut e).await;
        assert_eq!(e, before);
    }
}
