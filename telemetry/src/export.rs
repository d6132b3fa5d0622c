//! The OTLP exporter wrapped so that a collector that is down is reported once per outage,
//! not once per batch: the SDK's batch processor logs every failed export at ERROR (one a
//! second with [`crate::EXPORT_INTERVAL`]). A failed batch is counted as dropped and
//! reported to the processor as done, so it neither retries nor logs it again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

/// Spans lost to failed exports since start (shared with the [`crate::Guard`]).
pub type Dropped = Arc<AtomicU64>;

#[derive(Debug)]
pub struct Reporting<E> {
    inner: E,
    failing: AtomicBool,
    dropped: Dropped,
}

impl<E> Reporting<E> {
    pub fn new(inner: E, dropped: Dropped) -> Self {
        Reporting { inner, failing: AtomicBool::new(false), dropped }
    }
}

impl<E: SpanExporter> SpanExporter for Reporting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        match self.inner.export(batch).await {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    let dropped = self.dropped.load(Ordering::Relaxed);
                    tracing::info!(dropped_spans_total = dropped, "span export works again");
                }
            }
            Err(e) => {
                self.dropped.fetch_add(n, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "span export failed; spans are dropped until the collector answers (not logged again until then)");
                }
            }
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
