//! Tenant RPM and TPM limits with a sliding one-minute window (two fixed windows, the
//! previous weighted by how much of it still overlaps the last 60 s). Requests are counted
//! at admission; tokens (prompt + completion, from `usage`) when a response ends, so a
//! tenant over its TPM is refused from its next request on.
//!
//! Several gateways: each enforces `limit / N` where N is `--gateway-replicas`. With a
//! load balancer spreading a tenant evenly, the fleet-wide total stays within the limit;
//! with skew, a tenant is held below its limit (never above it). See docs/gateway.md.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use flotilla_api::spec::TenantSpec;
use tokio::time::Instant;

const MINUTE: Duration = Duration::from_secs(60);

/// A sliding per-minute counter.
#[derive(Debug, Clone)]
pub struct Window {
    start: Instant,
    prev: f64,
    cur: f64,
}

impl Window {
    pub fn new(now: Instant) -> Self {
        Window { start: now, prev: 0.0, cur: 0.0 }
    }
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= MINUTE * 2 {
            self.prev = 0.0;
            self.cur = 0.0;
            self.start = now;
        } else if elapsed >= MINUTE {
            self.prev = self.cur;
            self.cur = 0.0;
            self.start += MINUTE;
        }
    }
    /// The count over the last minute.
    pub fn value(&mut self, now: Instant) -> f64 {
        self.roll(now);
        let f = now.saturating_duration_since(self.start).as_secs_f64() / 60.0;
        self.prev * (1.0 - f).max(0.0) + self.cur
    }
    pub fn add(&mut self, now: Instant, n: f64) {
        self.roll(now);
        self.cur += n;
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Denied {
    /// "rpm" or "tpm".
    pub limit_name: &'static str,
    /// The per-gateway limit that applied.
    pub limit: u64,
    pub retry_after_s: u64,
}

/// Headers for an admitted request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Remaining {
    pub rpm: Option<(u64, u64)>,
    pub tpm: Option<(u64, u64)>,
}

#[derive(Debug)]
struct TenantWindows {
    requests: Window,
    tokens: Window,
}

/// Limit state of every tenant on this gateway.
#[derive(Debug)]
pub struct Limits {
    tenants: Mutex<HashMap<String, TenantWindows>>,
    replicas: u32,
}

impl Limits {
    pub fn new(replicas: u32) -> Self {
        Limits { tenants: Mutex::new(HashMap::new()), replicas: replicas.max(1) }
    }

    fn share(&self, limit: u64) -> u64 {
        if limit == 0 {
            0
        } else {
            (limit / self.replicas as u64).max(1)
        }
    }

    /// Admits (and counts) one request, or says which limit refuses it.
    pub fn admit(&self, tenant: &str, spec: &TenantSpec, now: Instant) -> Result<Remaining, Denied> {
        let (rpm, tpm) = (self.share(spec.rpm), self.share(spec.tpm));
        let mut map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let w = map
            .entry(tenant.to_string())
            .or_insert_with(|| TenantWindows { requests: Window::new(now), tokens: Window::new(now) });
        let used_tokens = w.tokens.value(now);
        if tpm > 0 && used_tokens >= tpm as f64 {
            return Err(Denied { limit_name: "tpm", limit: tpm, retry_after_s: retry_after(&w.tokens, now) });
        }
        let used_requests = w.requests.value(now);
        if rpm > 0 && used_requests + 1.0 > rpm as f64 {
            return Err(Denied { limit_name: "rpm", limit: rpm, retry_after_s: retry_after(&w.requests, now) });
        }
        w.requests.add(now, 1.0);
        Ok(Remaining {
            rpm: (rpm > 0).then(|| (rpm, (rpm as f64 - used_requests - 1.0).max(0.0) as u64)),
            tpm: (tpm > 0).then(|| (tpm, (tpm as f64 - used_tokens).max(0.0) as u64)),
        })
    }

    /// Counts tokens a response used.
    pub fn record_tokens(&self, tenant: &str, tokens: u64, now: Instant) {
        let mut map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = map.get_mut(tenant) {
            w.tokens.add(now, tokens as f64);
        }
    }
}

fn retry_after(w: &Window, now: Instant) -> u64 {
    let into = now.saturating_duration_since(w.start).as_secs();
    (60u64.saturating_sub(into)).clamp(1, 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rpm: u64, tpm: u64) -> TenantSpec {
        TenantSpec {
            rpm,
            tpm,
            priority: Default::default(),
            models: vec![],
            api_keys: vec![],
            max_concurrent_requests: None,
            keys: vec![],
        }
    }

    #[test]
    fn rpm_refuses_past_the_limit_and_recovers() {
        let l = Limits::new(1);
        let t0 = Instant::now();
        for i in 0..3 {
            let r = l.admit("a", &spec(3, 0), t0).unwrap();
            assert_eq!(r.rpm, Some((3, 2 - i)));
        }
        let d = l.admit("a", &spec(3, 0), t0).unwrap_err();
        assert_eq!((d.limit_name, d.limit), ("rpm", 3));
        assert!(d.retry_after_s >= 1);
        assert!(l.admit("b", &spec(3, 0), t0).is_ok(), "tenants are separate");
        // two minutes later the window is empty
        assert!(l.admit("a", &spec(3, 0), t0 + Duration::from_secs(121)).is_ok());
    }

    #[test]
    fn sliding_window_weights_the_previous_minute() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        w.add(t0, 60.0);
        assert_eq!(w.value(t0 + Duration::from_secs(30)), 60.0);
        assert!((w.value(t0 + Duration::from_secs(90)) - 30.0).abs() < 1e-6);
    }

    #[test]
    fn tpm_counts_recorded_tokens_and_replicas_divide() {
        let l = Limits::new(2);
        let t0 = Instant::now();
        assert!(l.admit("a", &spec(0, 100), t0).is_ok());
        l.record_tokens("a", 49, t0);
        assert!(l.admit("a", &spec(0, 100), t0).is_ok());
        l.record_tokens("a", 1, t0);
        let d = l.admit("a", &spec(0, 100), t0).unwrap_err();
        assert_eq!((d.limit_name, d.limit), ("tpm", 50));
    }
}
