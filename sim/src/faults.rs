//! Fault injection for chaos tests, served on `/sim/faults` only with `--allow-faults`:
//! crash (the process exits), hang (requests are accepted and never answered), slow
//! (step time multiplied), error rate (a fraction of inference requests get 500) and stall
//! (running requests stop producing tokens). State is atomics, read on every step/request.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The current faults, as `GET /sim/faults` shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultSpec {
    /// Requests are accepted and never answered.
    pub hang: bool,
    /// Step time multiplier (1 = normal).
    pub slow_factor: f64,
    /// Fraction of inference requests answered with 500.
    pub error_rate: f64,
    /// Running requests produce no tokens.
    pub stall: bool,
}

impl Default for FaultSpec {
    fn default() -> Self {
        FaultSpec { hang: false, slow_factor: 1.0, error_rate: 0.0, stall: false }
    }
}

/// A change, as `POST /sim/faults` takes it; absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultPatch {
    /// Exit the process (in-process servers stop serving instead).
    pub crash: Option<bool>,
    /// See [`FaultSpec::hang`].
    pub hang: Option<bool>,
    /// See [`FaultSpec::slow_factor`]; any positive finite number.
    pub slow_factor: Option<f64>,
    /// See [`FaultSpec::error_rate`]; 0..=1.
    pub error_rate: Option<f64>,
    /// See [`FaultSpec::stall`].
    pub stall: Option<bool>,
    /// Clear every fault first.
    pub reset: Option<bool>,
}

/// Shared fault switches.
#[derive(Debug, Default)]
pub struct Faults {
    spec: Mutex<FaultSpec>,
    hang: AtomicBool,
    stall: AtomicBool,
    slow_bits: AtomicU64,
    error_ppm: AtomicU32,
    counter: AtomicU64,
    changed: Notify,
    /// Signalled once when a crash is requested.
    pub crash: Notify,
}

impl Faults {
    /// No faults.
    pub fn new() -> Self {
        let f = Faults::default();
        f.slow_bits.store(1.0f64.to_bits(), Ordering::Relaxed);
        f
    }

    /// Applies a patch, or returns the sentence saying which field is wrong.
    pub fn apply(&self, patch: &FaultPatch) -> Result<FaultSpec, String> {
        if let Some(s) = patch.slow_factor {
            if !(s.is_finite() && s > 0.0) {
                return Err(format!("slow_factor must be a positive number, got {s}"));
            }
        }
        if let Some(e) = patch.error_rate {
            if !(0.0..=1.0).contains(&e) {
                return Err(format!("error_rate must be between 0 and 1, got {e}"));
            }
        }
        let mut spec = self.spec.lock().unwrap_or_else(|p| p.into_inner());
        if patch.reset == Some(true) {
            *spec = FaultSpec::default();
        }
        if let Some(v) = patch.hang {
            spec.hang = v;
        }
        if let Some(v) = patch.slow_factor {
            spec.slow_factor = v;
        }
        if let Some(v) = patch.error_rate {
            spec.error_rate = v;
        }
        if let Some(v) = patch.stall {
            spec.stall = v;
        }
        self.hang.store(spec.hang, Ordering::Relaxed);
        self.stall.store(spec.stall, Ordering::Relaxed);
        self.slow_bits.store(spec.slow_factor.to_bits(), Ordering::Relaxed);
        self.error_ppm.store((spec.error_rate * 1e6).round() as u32, Ordering::Relaxed);
        self.changed.notify_waiters();
        if patch.crash == Some(true) {
            self.crash.notify_one();
        }
        tracing::warn!(
            hang = spec.hang,
            slow_factor = spec.slow_factor,
            error_rate = spec.error_rate,
            stall = spec.stall,
            crash = patch.crash == Some(true),
            "sim faults changed"
        );
        Ok(spec.clone())
    }

    /// The current faults.
    pub fn spec(&self) -> FaultSpec {
        self.spec.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Requests should hang.
    pub fn hang(&self) -> bool {
        self.hang.load(Ordering::Relaxed)
    }

    /// Decoding is stalled.
    pub fn stalled(&self) -> bool {
        self.stall.load(Ordering::Relaxed)
    }

    /// Step time multiplier.
    pub fn slow_factor(&self) -> f64 {
        f64::from_bits(self.slow_bits.load(Ordering::Relaxed))
    }

    /// Whether this request should fail (deterministic sequence at the configured rate).
    pub fn should_fail(&self) -> bool {
        let ppm = self.error_ppm.load(Ordering::Relaxed);
        if ppm == 0 {
            return false;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        (crate::text::mix(n) % 1_000_000) < u64::from(ppm)
    }

    /// Resolves when the stall is lifted.
    pub async fn wait_unstalled(&self) {
        loop {
            let notified = self.changed.notified();
            if !self.stalled() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_validate_and_error_rate_is_close_to_requested() {
        let f = Faults::new();
        assert!(f.apply(&FaultPatch { error_rate: Some(1.5), ..Default::default() }).is_err());
        assert!(f.apply(&FaultPatch { slow_factor: Some(0.0), ..Default::default() }).is_err());
        assert_eq!(f.spec(), FaultSpec::default(), "a rejected patch changes nothing");
        f.apply(&FaultPatch { error_rate: Some(0.25), slow_factor: Some(3.0), ..Default::default() }).unwrap();
        let fails = (0..10_000).filter(|_| f.should_fail()).count();
        assert!((2000..3000).contains(&fails), "{fails}");
        assert_eq!(f.slow_factor(), 3.0);
        f.apply(&FaultPatch { reset: Some(true), ..Default::default() }).unwrap();
        assert!(!f.should_fail());
        assert_eq!(f.slow_factor(), 1.0);
    }

    #[tokio::test]
    async fn stall_blocks_until_lifted() {
        let f = std::sync::Arc::new(Faults::new());
        f.apply(&FaultPatch { stall: Some(true), ..Default::default() }).unwrap();
        let waiter = tokio::spawn({
            let f = f.clone();
            async move { f.wait_unstalled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        f.apply(&FaultPatch { stall: Some(false), ..Default::default() }).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
