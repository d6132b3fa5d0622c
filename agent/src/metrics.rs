//! The agent's Prometheus metrics (`flotilla_agent_*`), served on `--metrics-listen`
//! ([`serve`]). Two kinds:
//! - counters and histograms of events, updated where they happen (engine starts, crashes,
//!   give-ups and start-to-ready time in the engine task; adapter loads and unloads in the
//!   LoRA worker; drains; downloads and their bytes);
//! - gauges of state, computed from the engine reports and the GPU probe at each scrape
//!   ([`AgentMetrics::render`]): engines by state, restarts, download progress, GPUs by
//!   health, and the source policy's refusals by rule (counted by its guard).
//!
//! Labels are bounded: `engine` is sim or vllm, `state` and `health` come from fixed sets
//! (anything else is `other`), `result` is ok or error. No replica, model or adapter names:
//! those are `flotilla get` material, and unbounded.
//!
//! The listener serves `GET /metrics` (Prometheus text 0.0.4, [`to_prometheus_text`]) and
//! nothing else, loopback unless the operator names
//! an address; what it shows (counts and durations of this node's engines) is no more than
//! `flotilla get replicas` shows a viewer, so it asks for no identity, like the servers'
//! `--http-addr` /metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::pb::{EngineReport, GpuInfo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub use flotilla_api::metrics_text::to_prometheus_text;

/// Engine states a report may be in (anything else counts as `other`).
pub const ENGINE_STATES: [&str; 8] =
    ["downloading", "starting", "ready", "crashed", "failed", "stopping", "stopped", "other"];
/// GPU health states.
pub const GPU_STATES: [&str; 4] = ["healthy", "degraded", "failed", "other"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabels {
    /// `sim` or `vllm`.
    pub engine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    pub health: String,
}

fn result(ok: bool) -> ResultLabels {
    ResultLabels { result: if ok { "ok" } else { "error" }.into() }
}

fn engine(kind: &str) -> EngineLabels {
    EngineLabels { engine: if kind == "vllm" { "vllm" } else { "sim" }.into() }
}

/// Every metric of one agent.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    engine_starts: Family<EngineLabels, Counter>,
    engine_crashes: Family<EngineLabels, Counter>,
    engine_failures: Family<EngineLabels, Counter>,
    engine_start_seconds: Family<EngineLabels, Histogram>,
    engine_drain_seconds: Histogram,
    adapter_loads: Family<ResultLabels, Counter>,
    adapter_load_seconds: Histogram,
    adapter_unloads: Family<ResultLabels, Counter>,
    downloads: Family<ResultLabels, Counter>,
    download_bytes: Counter,
    download_seconds: Histogram,
    engines: Family<StateLabels, Gauge>,
    engine_restarts: Gauge,
    downloads_in_progress: Gauge,
    gpus: Family<HealthLabels, Gauge>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let seconds = |start: f64, n: u16| Histogram::new(exponential_buckets(start, 2.0, n));
        let engine_start_seconds = Family::<EngineLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.25, 2.0, 14))
        });
        let m = AgentMetrics {
            registry: Registry::default(),
            engine_starts: Family::default(),
            engine_crashes: Family::default(),
            engine_failures: Family::default(),
            engine_start_seconds,
            engine_drain_seconds: seconds(0.05, 14),
            adapter_loads: Family::default(),
            adapter_load_seconds: seconds(0.01, 14),
            adapter_unloads: Family::default(),
            downloads: Family::default(),
            download_bytes: Counter::default(),
            download_seconds: seconds(0.5, 14),
            engines: Family::default(),
            engine_restarts: Gauge::default(),
            downloads_in_progress: Gauge::default(),
            gpus: Family::default(),
        };
        let mut r = Registry::with_prefix("flotilla_agent");
        r.register("engine_starts", "Engine processes started (first starts and restarts)", m.engine_starts.clone());
        r.register("engine_crashes", "Engine processes that exited or were killed unasked", m.engine_crashes.clone());
        r.register("engine_failures", "Engines given up on after too many crashes", m.engine_failures.clone());
        r.register_with_unit(
            "engine_start",
            "Time from an engine's start to its first healthy /health",
            prometheus_client::registry::Unit::Seconds,
            m.engine_start_seconds.clone(),
        );
        r.register_with_unit(
            "engine_drain",
            "Time an unassigned engine spent draining its requests before it was stopped",
            prometheus_client::registry::Unit::Seconds,
            m.engine_drain_seconds.clone(),
        );
        r.register("adapter_loads", "LoRA adapter loads into engines, by result", m.adapter_loads.clone());
        r.register_with_unit(
            "adapter_load",
            "Time of a successful adapter load (download and engine load)",
            prometheus_client::registry::Unit::Seconds,
            m.adapter_load_seconds.clone(),
        );
        r.register("adapter_unloads", "LoRA adapter unloads from engines, by result", m.adapter_unloads.clone());
        r.register("downloads", "Model downloads finished, by result", m.downloads.clone());
        r.register_with_unit(
            "download",
            "Model bytes written into the node's cache by downloads (rate() of it is the download rate)",
            prometheus_client::registry::Unit::Bytes,
            m.download_bytes.clone(),
        );
        r.register_with_unit(
            "download",
            "Time of a successful model download (cache hits included)",
            prometheus_client::registry::Unit::Seconds,
            m.download_seconds.clone(),
        );
        r.register("engines", "Engines this agent runs, by state", m.engines.clone());
        r.register("engine_restarts", "Restarts of the engines this agent runs now, summed", m.engine_restarts.clone());
        r.register("downloads_in_progress", "Engines waiting on their model download", m.downloads_in_progress.clone());
        r.register("gpus", "GPUs of this node, by health", m.gpus.clone());
        AgentMetrics { registry: r, ..m }
    }
}

impl AgentMetrics {
    pub fn engine_started(&self, kind: &str) {
        self.engine_starts.get_or_create(&engine(kind)).inc();
    }

    pub fn engine_crashed(&self, kind: &str) {
        self.engine_crashes.get_or_create(&engine(kind)).inc();
    }

    pub fn engine_failed(&self, kind: &str) {
        self.engine_failures.get_or_create(&engine(kind)).inc();
    }

    pub fn engine_ready(&self, kind: &str, took: Duration) {
        self.engine_start_seconds.get_or_create(&engine(kind)).observe(took.as_secs_f64());
    }

    pub fn engine_drained(&self, took: Duration) {
        self.engine_drain_seconds.observe(took.as_secs_f64());
    }

    pub fn adapter_loaded(&self, ok: bool, took: Duration) {
        self.adapter_loads.get_or_create(&result(ok)).inc();
        if ok {
            self.adapter_load_seconds.observe(took.as_secs_f64());
        }
    }

    pub fn adapter_unloaded(&self, ok: bool) {
        self.adapter_unloads.get_or_create(&result(ok)).inc();
    }

    /// `n` more bytes of a model arrived in the cache.
    pub fn download_bytes(&self, n: u64) {
        self.download_bytes.inc_by(n);
    }

    pub fn downloaded(&self, ok: bool, took: Duration) {
        self.downloads.get_or_create(&result(ok)).inc();
        if ok {
            self.download_seconds.observe(took.as_secs_f64());
        }
    }

    /// The OpenMetrics text of every metric, the gauges set from `reports` and `gpus`
    /// first, with the source policy's `refusals` per rule (counted by its guard) and each
    /// GPU's `usage` where known (a series per GPU index, absent when unknown) and the model
    /// cache's size.
    pub fn render(
        &self,
        reports: &[EngineReport],
        gpus: &[GpuInfo],
        usage: &[crate::gpu::GpuUsage],
        refusals: &[(&str, u64)],
        cache: crate::download::CacheUsage,
    ) -> String {
        for s in ENGINE_STATES {
            let n = reports.iter().filter(|r| bucket(&r.state, &ENGINE_STATES) == s).count();
            self.engines.get_or_create(&StateLabels { state: s.into() }).set(n as i64);
        }
        self.engine_restarts.set(reports.iter().map(|r| i64::from(r.restarts)).sum());
        self.downloads_in_progress.set(reports.iter().filter(|r| r.state == "downloading").count() as i64);
        for s in GPU_STATES {
            let n = gpus.iter().filter(|g| bucket(gpu_state(g), &GPU_STATES) == s).count();
            self.gpus.get_or_create(&HealthLabels { health: s.into() }).set(n as i64);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out.push_str(
            "# HELP flotilla_agent_download_refusals Downloads refused by the source policy, by rule.\n\
             # TYPE flotilla_agent_download_refusals counter\n",
        );
        for (rule, n) in refusals {
            out.push_str(&format!("flotilla_agent_download_refusals_total{{rule=\"{rule}\"}} {n}\n"));
        }
        gpu_usage_text(&mut out, usage);
        out.push_str(&format!(
            "# HELP flotilla_agent_model_cache_bytes Bytes of the node's model cache on disk (partial downloads included).\n\
             # TYPE flotilla_agent_model_cache_bytes gauge\nflotilla_agent_model_cache_bytes {}\n\
             # HELP flotilla_agent_model_cache_models Models downloaded completely into the node's cache.\n\
             # TYPE flotilla_agent_model_cache_models gauge\nflotilla_agent_model_cache_models {}\n",
            cache.bytes, cache.models
        ));
        out.push_str("# EOF\n");
        out
    }
}

/// Per-GPU gauges of `usage`, each family only when some GPU reports it.
fn gpu_usage_text(out: &mut String, usage: &[crate::gpu::GpuUsage]) {
    use crate::gpu::GpuUsage;
    type Read = fn(&GpuUsage) -> Option<f64>;
    let families: [(&str, &str, Read); 5] = [
        ("flotilla_agent_gpu_utilization_ratio", "Fraction of time a kernel ran on the GPU (NVML)", |u| u.utilization),
        ("flotilla_agent_gpu_memory_used_bytes", "GPU memory in use (NVML)", |u| u.memory_used_bytes.map(|b| b as f64)),
        ("flotilla_agent_gpu_memory_total_bytes", "GPU memory installed (NVML)", |u| {
            u.memory_total_bytes.map(|b| b as f64)
        }),
        ("flotilla_agent_gpu_temperature_celsius", "GPU die temperature (NVML)", |u| u.temperature_celsius),
        ("flotilla_agent_gpu_power_watts", "GPU power draw (NVML)", |u| u.power_watts),
    ];
    for (name, help, read) in families {
        let known: Vec<(u32, f64)> = usage.iter().filter_map(|u| Some((u.index, read(u)?))).collect();
        if known.is_empty() {
            continue;
        }
        out.push_str(&format!("# HELP {name} {help}.\n# TYPE {name} gauge\n"));
        for (gpu, v) in known {
            out.push_str(&format!("{name}{{gpu=\"{gpu}\"}} {v}\n"));
        }
    }
}

/// A GPU's state, read from `healthy` for agents' probes that set no state.
fn gpu_state(g: &GpuInfo) -> &str {
    match (g.state.as_str(), g.healthy) {
        ("", true) => "healthy",
        ("", false) => "failed",
        (s, _) => s,
    }
}

/// `value` if it is one of `known`, else `other`.
fn bucket<'a>(value: &str, known: &[&'a str]) -> &'a str {
    known.iter().copied().find(|k| *k == value).unwrap_or("other")
}

/// What [`serve`] renders on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown` turns true. Other paths get 404.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Render,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move {
                // encoding walks every family: off the reactor, though it is small
                let body = tokio::task::spawn_blocking(move || to_prometheus_text(&render())).await.unwrap_or_default();
                ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
            }
        }),
    );
    let stop = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
        tracing::warn!(error = %e, "metrics listener failed");
    }
}

/// Binds `addr` (an error names it).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, crate::AgentError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::AgentError::invalid("metrics-listen", format!("cannot listen on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_follow_the_reports_and_labels_stay_bounded() {
        let m = AgentMetrics::default();
        m.engine_started("sim");
        m.engine_started("something-else");
        m.engine_crashed("vllm");
        m.engine_ready("sim", Duration::from_millis(1500));
        m.adapter_loaded(true, Duration::from_millis(40));
        m.adapter_loaded(false, Duration::from_millis(40));
        m.download_bytes(1000);
        m.download_bytes(24);
        let report = |state: &str, restarts| EngineReport { state: state.into(), restarts, ..Default::default() };
        let reports = [report("ready", 2), report("ready", 0), report("downloading", 0), report("weird", 1)];
        let gpu = |state: &str, healthy| GpuInfo { state: state.into(), healthy, ..Default::default() };
        let gpus = [gpu("healthy", true), gpu("", false), gpu("degraded", true)];
        let usage = [
            crate::gpu::GpuUsage {
                index: 0,
                utilization: Some(0.5),
                temperature_celsius: Some(60.0),
                ..Default::default()
            },
            crate::gpu::GpuUsage { index: 2, utilization: Some(1.0), ..Default::default() },
        ];
        let cache = crate::download::CacheUsage { models: 2, bytes: 5 << 30 };
        let text = m.render(&reports, &gpus, &usage, &[("schemes", 2), ("hosts", 0)], cache);
        for line in [
            "flotilla_agent_engine_starts_total{engine=\"sim\"} 2",
            "flotilla_agent_engine_crashes_total{engine=\"vllm\"} 1",
            "flotilla_agent_engines{state=\"ready\"} 2",
            "flotilla_agent_engines{state=\"other\"} 1",
            "flotilla_agent_engines{state=\"failed\"} 0",
            "flotilla_agent_engine_restarts 3",
            "flotilla_agent_downloads_in_progress 1",
            "flotilla_agent_gpus{health=\"failed\"} 1",
            "flotilla_agent_gpus{health=\"degraded\"} 1",
            "flotilla_agent_adapter_loads_total{result=\"error\"} 1",
            "flotilla_agent_engine_start_seconds_count{engine=\"sim\"} 1",
            "flotilla_agent_adapter_load_seconds_count 1",
            "flotilla_agent_download_refusals_total{rule=\"schemes\"} 2",
            "flotilla_agent_gpu_utilization_ratio{gpu=\"0\"} 0.5",
            "flotilla_agent_gpu_utilization_ratio{gpu=\"2\"} 1",
            "flotilla_agent_gpu_temperature_celsius{gpu=\"0\"} 60",
            "flotilla_agent_download_bytes_total 1024",
            "flotilla_agent_model_cache_bytes 5368709120",
            "flotilla_agent_model_cache_models 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1, "one terminator, after the refusals");
        assert!(!text.contains("flotilla_agent_gpu_power_watts"), "no series for what no GPU reports");
        let (code, lint) = flotilla_testkit::promtool::check_metrics(&to_prometheus_text(&text));
        assert_eq!(code, 0, "{lint}");
    }
}
