//! The gateway's own view of each endpoint: requests in flight, EWMAs of time to first
//! token and time per output token, and passive outlier ejection (consecutive failures
//! eject for a doubling time; then one half-open probe decides). [`Outlier`] is pure.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::table::{EndpointId, EngineLoad};

/// What routing sees of an endpoint's load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EndpointLoad {
    /// Requests this gateway has in flight there.
    pub in_flight: u32,
    pub engine: EngineLoad,
    /// EWMA of time to first token, seconds (0: no sample yet).
    pub ttft: f64,
    /// EWMA of time per output token, seconds.
    pub tpot: f64,
    /// Prompt tokens this gateway sent there to compute that have not begun streaming
    /// (`kv-aware`'s estimate of work queued ahead).
    pub prefill_pending: u64,
}

impl EndpointLoad {
    /// The queue-length signal of least-request: the engine's running plus waiting
    /// requests (which include other gateways' traffic, but are a scrape old), or this
    /// gateway's in-flight count when that is higher (it is always fresh).
    pub fn queue(&self) -> f64 {
        (self.in_flight as f64).max(self.engine.running + self.engine.waiting)
    }
}

/// Outlier-ejection state of one endpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub ejected_until: Option<Instant>,
    pub ejections: u32,
    /// A half-open probe is in flight.
    pub probing: bool,
}

/// May a request go to this endpoint now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Healthy,
    /// Ejected: route elsewhere.
    Ejected,
    /// Ejection expired: exactly one probe may go.
    Probe,
}

impl Outlier {
    pub fn availability(&self, now: Instant) -> Availability {
        match self.ejected_until {
            None => Availability::Healthy,
            Some(t) if now < t || self.probing => Availability::Ejected,
            Some(_) => Availability::Probe,
        }
    }

    /// Records a success; closes the breaker.
    pub fn on_success(&mut self) {
        *self = Outlier::default();
    }

    /// Records a failure; returns true when it ejects the endpoint.
    pub fn on_failure(&mut self, now: Instant, after: u32, base: Duration) -> bool {
        self.consecutive_failures += 1;
        let was_probe = self.probing;
        self.probing = false;
        if was_probe || (self.ejected_until.is_none() && self.consecutive_failures >= after) {
            let factor = 1u32 << self.ejections.min(5);
            self.ejections += 1;
            self.ejected_until = Some(now + base * factor);
            return true;
        }
        false
    }
}

/// Live counters of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub in_flight: AtomicU32,
    /// See [`EndpointLoad::prefill_pending`].
    pub prefill_pending: AtomicU64,
    ttft_bits: AtomicU64,
    tpot_bits: AtomicU64,
    pub outlier: Mutex<Outlier>,
}

const EWMA_ALPHA: f64 = 0.2;

fn ewma(cell: &AtomicU64, sample: f64) {
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
        let old = f64::from_bits(bits);
        let new = if old == 0.0 { sample } else { old + EWMA_ALPHA * (sample - old) };
        Some(new.to_bits())
    });
}

impl EndpointStats {
    pub fn record_ttft(&self, d: Duration) {
        ewma(&self.ttft_bits, d.as_secs_f64());
    }
    pub fn record_tpot(&self, d: Duration) {
        ewma(&self.tpot_bits, d.as_secs_f64());
    }
    pub fn load(&self, engine: EngineLoad) -> EndpointLoad {
        EndpointLoad {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            engine,
            ttft: f64::from_bits(self.ttft_bits.load(Ordering::Relaxed)),
            tpot: f64::from_bits(self.tpot_bits.load(Ordering::Relaxed)),
            prefill_pending: self.prefill_pending.load(Ordering::Relaxed),
        }
    }
    pub fn availability(&self, now: Instant) -> Availability {
        self.outlier.lock().unwrap_or_else(|e| e.into_inner()).availability(now)
    }
}

/// Stats of every endpoint ever seen (kept across table updates so counts survive).
#[derive(Debug, Default)]
pub struct LoadBook {
    map: RwLock<HashMap<EndpointId, Arc<EndpointStats>>>,
}

impl LoadBook {
    pub fn get(&self, id: &EndpointId) -> Arc<EndpointStats> {
        if let Some(s) = self.map.read().unwrap_or_else(|e| e.into_inner()).get(id) {
            return s.clone();
        }
        self.map.write().unwrap_or_else(|e| e.into_inner()).entry(id.clone()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_consecutive_failures_then_probes_once() {
        let t0 = Instant::now();
        let base = Duration::from_secs(10);
        let mut o = Outlier::default();
        assert!(!o.on_failure(t0, 3, base));
        o.on_success();
        assert!(!o.on_failure(t0, 3, base));
        assert!(!o.on_failure(t0, 3, base));
        assert!(o.on_failure(t0, 3, base));
        assert_eq!(o.availability(t0 + Duration::from_secs(9)), Availability::Ejected);
        assert_eq!(o.availability(t0 + Duration::from_secs(10)), Availability::Probe);
        o.probing = true;
        assert_eq!(o.availability(t0 + Duration::from_secs(11)), Availability::Ejected);
        // the probe fails: ejected again for twice as long
        let t1 = t0 + Duration::from_secs(11);
        assert!(o.on_failure(t1, 3, base));
        assert_eq!(o.availability(t1 + Duration::from_secs(19)), Availability::Ejected);
        assert_eq!(o.availability(t1 + Duration::from_secs(20)), Availability::Probe);
        o.on_success();
        assert_eq!(o.availability(t1), Availability::Healthy);
    }

    #[test]
    fn ewma_moves_toward_samples() {
        let s = EndpointStats::default();
        s.record_ttft(Duration::from_millis(100));
        assert!((s.load(EngineLoad::default()).ttft - 0.1).abs() < 1e-9);
        s.record_ttft(Duration::from_millis(200));
        assert!((s.load(EngineLoad::default()).ttft - 0.12).abs() < 1e-9);
    }
}
