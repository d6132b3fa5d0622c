//! OpenTelemetry tracing for every role, off by default.
//!
//! ```text
//! tracing spans (flotilla_* targets) --> tracing-opentelemetry layer --> SdkTracerProvider
//!   --> BatchSpanProcessor (own thread, bounded queue) --> OTLP/gRPC exporter --> collector
//! log events --> fmt layer (RUST_LOG) --> stderr, as without tracing
//! ```
//!
//! [`init`] installs the process's subscriber: the stderr log layer always, and, when an
//! OTLP endpoint is given (`--otlp-endpoint URL`), a `tracing-opentelemetry` layer that
//! exports the spans of flotilla's own crates (targets starting `flotilla`, DEBUG and
//! above, whatever `RUST_LOG` says: the request spans are DEBUG so that a gateway without
//! an endpoint does not even build them) with the role's `service.name`.
//!
//! **Exporter choice.** opentelemetry-otlp 0.33's gRPC exporter is built on tonic 0.14 and
//! prost 0.14, the versions the workspace already uses for its own API, so OTLP/gRPC (the
//! collector's default port 4317) adds only the opentelemetry crates, opentelemetry-proto's
//! generated types and tonic-types: no second tonic/prost/hyper/http. The HTTP/protobuf
//! exporter would have needed opentelemetry-http and a client adapter (reqwest by default)
//! for no gain, and a hand-written export over opentelemetry-proto would duplicate the
//! SDK's batching, which is the part that must be right (bounded, off the request path).
//!
//! **The request path never waits on the collector.** Finished spans go to the SDK's
//! `BatchSpanProcessor`: a bounded queue ([`MAX_QUEUE`] spans) drained by its own thread
//! in batches every [`EXPORT_INTERVAL`]; a full queue drops the span (the SDK logs the
//! first drop once and the total at shutdown, through `tracing` at WARN), and an export
//! is bounded by [`EXPORT_TIMEOUT`] and not retried, so an unreachable collector costs
//! only dropped spans: a failed export is logged once per outage, and the spans it lost
//! are counted and their total logged at shutdown (`export`). The gRPC channel connects lazily: a collector that is down at start
//! is not an error.
//!
//! [`propagation`] carries W3C trace context (`traceparent`, `tracestate`) in and out of
//! HTTP headers.
#![forbid(unsafe_code)]

mod export;
pub mod propagation;

use std::sync::atomic::Ordering;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

/// Spans held for export at most; more are dropped (counted by the SDK).
pub const MAX_QUEUE: usize = 4096;
/// Spans per export request at most.
pub const MAX_BATCH: usize = 512;
/// How often queued spans are exported.
pub const EXPORT_INTERVAL: Duration = Duration::from_secs(1);
/// The longest one export may take before its batch is dropped.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A bad `--otlp-endpoint` or an exporter that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--otlp-endpoint {0:?} is not an http:// URL (example: http://127.0.0.1:4317; https is not supported)")]
    BadEndpoint(String),
    #[error("cannot build the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

impl TelemetryError {
    /// The stable code of the error.
    pub fn code(&self) -> &'static str {
        match self {
            TelemetryError::BadEndpoint(_) => "telemetry.bad_endpoint",
            TelemetryError::Exporter { .. } => "telemetry.exporter",
        }
    }
}

/// Keeps the exporter alive; dropping it exports what is queued (bounded by
/// [`EXPORT_TIMEOUT`]) and stops the export thread.
#[must_use = "dropping the guard stops the export"]
#[derive(Debug, Default)]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
    dropped: export::Dropped,
}

impl Guard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Spans lost to failed exports so far (not counting those a full queue dropped,
    /// which the SDK logs itself).
    pub fn failed_spans(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Exports every span finished so far (blocking: call it from `spawn_blocking` in
    /// async code). Tests use it instead of waiting for the next batch.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            if let Err(e) = p.force_flush() {
                tracing::debug!(error = %e, "span flush failed");
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown_with_timeout(EXPORT_TIMEOUT) {
                tracing::debug!(error = %e, "span exporter shutdown");
            }
            let lost = self.failed_spans();
            if lost > 0 {
                tracing::warn!(spans = lost, "spans were not exported: the collector did not take them");
            }
        }
    }
}

/// Checks an endpoint URL (pure). Plain `http://` only: the workspace's tonic is built
/// without its TLS features (flotilla's own TLS sits below tonic, `flotilla-security`), so
/// an `https://` collector is refused here rather than failing at every export.
pub fn validate_endpoint(url: &str) -> Result<(), TelemetryError> {
    match url.strip_prefix("http://") {
        Some(r) if !r.is_empty() && !r.starts_with('/') => Ok(()),
        _ => Err(TelemetryError::BadEndpoint(url.to_string())),
    }
}

/// The provider exporting to `endpoint` as `service` (batched, see the module docs).
/// Must run inside a tokio runtime (the gRPC channel's worker is spawned on it).
pub fn provider(service: &'static str, endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    provider_counting(service, endpoint, export::Dropped::default())
}

fn provider_counting(
    service: &'static str,
    endpoint: &str,
    dropped: export::Dropped,
) -> Result<SdkTracerProvider, TelemetryError> {
    validate_endpoint(endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
        .build()
        .map_err(|e| TelemetryError::Exporter { endpoint: endpoint.to_string(), reason: e.to_string() })?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(MAX_QUEUE)
        .with_max_export_batch_size(MAX_BATCH)
        .with_scheduled_delay(EXPORT_INTERVAL)
        .build();
    let processor =
        BatchSpanProcessor::builder(export::Reporting::new(exporter, dropped)).with_batch_config(batch).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}

/// Whether a span or event belongs to flotilla's own crates (the only ones exported: the
/// exporter's own tonic/hyper spans must never feed back into it), at DEBUG or above.
fn ours(target: &str, level: tracing::Level) -> bool {
    target.starts_with("flotilla") && level <= tracing::Level::DEBUG
}

/// The OpenTelemetry layer exporting through `provider`, filtered to flotilla's spans.
pub fn otel_layer<S>(provider: &SdkTracerProvider, service: &'static str) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_location(false)
        .with_threads(false)
        .with_filter(filter_fn(|m| ours(m.target(), *m.level())))
}

/// Installs the process's subscriber: logs to stderr (`RUST_LOG`, else `default_filter`)
/// and, with an `otlp_endpoint`, span export as `service` (`flotilla-gateway`, …).
/// Without an endpoint this is the plain log subscriber the roles always had. A second
/// call (tests) leaves the first subscriber in place.
pub fn init(service: &'static str, otlp_endpoint: Option<&str>, default_filter: &str) -> Result<Guard, TelemetryError> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = || tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.is_empty()) else {
        let _ = Registry::default().with(fmt().with_filter(filter())).try_init();
        return Ok(Guard::default());
    };
    let dropped = export::Dropped::default();
    let provider = provider_counting(service, endpoint, dropped.clone())?;
    let installed =
        Registry::default().with(fmt().with_filter(filter())).with(otel_layer(&provider, service)).try_init().is_ok();
    if installed {
        tracing::info!(endpoint, service, "exporting traces over OTLP/gRPC");
    }
    Ok(Guard { provider: Some(provider), dropped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_http_urls() {
        for ok in ["http://127.0.0.1:4317", "http://otel.example:4317", "http://collector"] {
            assert!(validate_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in ["127.0.0.1:4317", "http://", "grpc://x:4317", "", "http:///x", "https://otel.example:4317"] {
            let e = validate_endpoint(bad).unwrap_err();
            assert_eq!(e.code(), "telemetry.bad_endpoint");
            assert!(e.to_string().contains("--otlp-endpoint"), "{e}");
        }
    }

    #[test]
    fn only_flotilla_targets_are_exported() {
        use tracing::Level;
        assert!(ours("flotilla_gateway::server", Level::DEBUG));
        assert!(ours("flotilla_cluster", Level::INFO));
        assert!(ours("flotilla::cmd::server", Level::WARN));
        assert!(!ours("flotilla_gateway", Level::TRACE));
        assert!(!ours("tonic::transport", Level::INFO));
        assert!(!ours("h2::codec", Level::DEBUG));
        assert!(!ours("opentelemetry_sdk", Level::WARN));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn an_unreachable_collector_costs_dropped_spans_only() {
        use opentelemetry::trace::{Span as _, Tracer as _};
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dropped = export::Dropped::default();
        let provider =
            provider_counting("flotilla-test", &format!("http://127.0.0.1:{port}"), dropped.clone()).unwrap();
        let tracer = provider.tracer("flotilla-test");
        // twice what the queue holds, ended on this (request-path) thread: never waits
        let t0 = tokio::time::Instant::now();
        for _ in 0..2 * MAX_QUEUE {
            tracer.start("request").end();
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "ending spans took {:?}", t0.elapsed());
        // and stopping, with nothing to export to, is bounded
        let stopped = tokio::task::spawn_blocking(move || {
            let t = tokio::time::Instant::now();
            let _ = provider.shutdown_with_timeout(EXPORT_TIMEOUT);
            t.elapsed()
        })
        .await
        .unwrap();
        assert!(stopped <= EXPORT_TIMEOUT + Duration::from_secs(2), "shutdown took {stopped:?}");
        // what reached the exporter was tried and counted as lost (the rest the full queue dropped)
        let lost = dropped.load(Ordering::Relaxed);
        assert!(lost > 0 && lost <= 2 * MAX_QUEUE as u64, "{lost} spans counted as lost");
    }
}
