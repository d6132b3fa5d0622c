//! The per-tenant bound on requests in flight: a tenant's `max_concurrent_requests` (its
//! share on this gateway, like RPM: `/ --gateway-replicas`), else the gateway's
//! `--tenant-max-concurrency`; 0 is unbounded. A request takes a [`Permit`] in the limits
//! layer and holds it until its response body is dropped (a stream holds it to its last
//! chunk, or until the client leaves); past the bound the request gets 429
//! `concurrency_limit_exceeded` with Retry-After.
//!
//! ```text
//! limits layer ── InFlight::acquire(tenant, limit) ── Ok(Permit) ──> proxy ──> body (holds it)
//!                                                  └─ Err(Busy) ──> 429, tenant_rejections_total
//! ```
//! With auth off there is no tenant to bound (requests are `anonymous`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::TenantLabels;

/// The bound that applies to a tenant on this gateway (pure): `spec` is its
/// `max_concurrent_requests`, `default` the gateway's `--tenant-max-concurrency`,
/// `replicas` its `--gateway-replicas`. None: unbounded.
pub fn limit_for(spec: Option<u32>, default: u32, replicas: u32) -> Option<u32> {
    match spec {
        Some(0) => None,
        Some(n) => Some((n / replicas.max(1)).max(1)),
        None if default == 0 => None,
        None => Some(default),
    }
}

/// A tenant is at its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    pub limit: u32,
}

/// Requests in flight per tenant on this gateway.
#[derive(Debug, Clone)]
pub struct InFlight {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    gauge: Family<TenantLabels, Gauge>,
}

impl InFlight {
    pub fn new(gauge: Family<TenantLabels, Gauge>) -> Self {
        InFlight { counts: Arc::default(), gauge }
    }

    /// Takes a place for one request of `tenant`, or says it is at `limit` (None: unbounded,
    /// counted all the same).
    pub fn acquire(&self, tenant: &str, limit: Option<u32>) -> Result<Permit, Busy> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(tenant.to_string()).or_insert(0);
        if let Some(limit) = limit.filter(|l| *n >= *l) {
            if *n == 0 {
                counts.remove(tenant);
            }
            return Err(Busy { limit });
        }
        *n += 1;
        self.gauge.get_or_create(&TenantLabels { tenant: tenant.to_string() }).set(i64::from(*n));
        Ok(Permit { book: self.clone(), tenant: tenant.to_string() })
    }

    /// Requests of `tenant` in flight.
    pub fn count(&self, tenant: &str) -> u32 {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).get(tenant).copied().unwrap_or(0)
    }

    fn release(&self, tenant: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let left = match counts.get_mut(tenant) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            counts.remove(tenant); // the map holds only tenants with requests in flight
        }
        self.gauge.get_or_create(&TenantLabels { tenant: tenant.to_string() }).set(i64::from(left));
    }
}

/// One request's place; released when dropped.
#[derive(Debug)]
pub struct Permit {
    book: InFlight,
    tenant: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.book.release(&self.tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tenant_spec_wins_and_zero_is_unbounded() {
        let cases = [
            // (spec, default, replicas, want)
            (None, 256, 1, Some(256)),
            (None, 0, 1, None),
            (Some(0), 256, 1, None),
            (Some(8), 256, 1, Some(8)),
            (Some(8), 0, 1, Some(8)),
            (Some(8), 256, 2, Some(4)),
            (Some(3), 256, 2, Some(1)),
            (Some(1), 256, 4, Some(1)),
            (None, 256, 4, Some(256)),
            (Some(5), 256, 0, Some(5)),
        ];
        for (spec, default, replicas, want) in cases {
            assert_eq!(limit_for(spec, default, replicas), want, "{spec:?} {default} {replicas}");
        }
    }

    #[test]
    fn permits_count_until_dropped_and_tenants_are_separate() {
        let f = InFlight::new(Family::default());
        let a1 = f.acquire("a", Some(2)).unwrap();
        let a2 = f.acquire("a", Some(2)).unwrap();
        assert_eq!(f.acquire("a", Some(2)).unwrap_err(), Busy { limit: 2 });
        let b = f.acquire("b", Some(1)).unwrap();
        assert_eq!(f.acquire("b", Some(1)).unwrap_err(), Busy { limit: 1 });
        assert_eq!((f.count("a"), f.count("b")), (2, 1));
        drop(a1);
        let a3 = f.acquire("a", Some(2)).unwrap();
        drop((a2, a3, b));
        assert_eq!((f.count("a"), f.count("b")), (0, 0));
        assert!(f.counts.lock().unwrap().is_empty(), "idle tenants leave the map");
        let many: Vec<Permit> = (0..100).map(|_| f.acquire("c", None).unwrap()).collect();
        assert_eq!(f.count("c"), 100, "unbounded, still counted");
        drop(many);
        assert_eq!(f.acquire("d", Some(0)).unwrap_err(), Busy { limit: 0 });
        assert!(f.counts.lock().unwrap().is_empty());
        let g = f.gauge.get_or_create(&TenantLabels { tenant: "a".into() }).get();
        assert_eq!(g, 0);
    }
}
