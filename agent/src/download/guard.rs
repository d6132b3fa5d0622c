//! The download path's side of [`crate::source_policy`]: it resolves hosts before
//! connecting and checks every address, asks the data dir's filesystem for its free space
//! (`statvfs`), logs each refusal once with its rule, and counts refusals by rule (the
//! label values are [`Rule::ALL`]'s, a fixed set).

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::source_policy::{url, Policy, Refusal, Rule, Target};

/// A download refused by the policy, or failed for another reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// Refused by the source policy: not retried, and what was fetched is removed.
    Refused(String),
    /// Anything else.
    Failed(String),
}

impl FetchError {
    /// The message.
    pub fn into_message(self) -> String {
        match self {
            FetchError::Refused(m) | FetchError::Failed(m) => m,
        }
    }
}

impl From<String> for FetchError {
    fn from(m: String) -> Self {
        FetchError::Failed(m)
    }
}

/// The policy and its refusal counters.
#[derive(Debug)]
pub struct Guard {
    policy: Policy,
    refusals: [AtomicU64; Rule::ALL.len()],
}

impl Guard {
    /// Guards downloads with `policy`.
    pub fn new(policy: Policy) -> Self {
        Guard { policy, refusals: Default::default() }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Counts and logs a refusal; returns it as the download's error.
    pub fn refused(&self, r: Refusal) -> FetchError {
        self.refusals[r.rule.index()].fetch_add(1, Ordering::Relaxed);
        tracing::warn!(rule = r.rule.label(), url = %r.url, detail = %r.detail, "download refused by the source policy");
        FetchError::Refused(r.to_string())
    }

    /// Checks a source as written.
    pub fn source(&self, source: &str) -> Result<Target, FetchError> {
        self.policy.check(source).map_err(|r| self.refused(r))
    }

    /// Checks a request about to be sent to `url` (the first hop: a source, or a URL on one
    /// of the operator's endpoints): the addresses its host resolves to.
    pub async fn request(&self, url: &str) -> Result<(), FetchError> {
        let t = url::parse(url).map_err(|r| self.refused(r))?;
        self.addresses(url, &t).await
    }

    /// Checks the target of a redirect: https, host, addresses.
    pub async fn redirect(&self, to: &str) -> Result<(), FetchError> {
        let t = self.policy.check_redirect(to).map_err(|r| self.refused(r))?;
        self.addresses(to, &t).await
    }

    async fn addresses(&self, url: &str, t: &Target) -> Result<(), FetchError> {
        if !self.policy.needs_address_check(t) {
            return Ok(());
        }
        let (Some(host), Some(port)) = (&t.host, t.port) else { return Ok(()) };
        let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(a) => a.map(|s| s.ip()).collect(),
                // Unresolvable: the connection fails on its own (and is retried as such).
                Err(_) => return Ok(()),
            },
        };
        self.policy.check_addresses(url, host, &addrs).map_err(|r| self.refused(r))
    }

    /// Checks a size against `max_bytes`.
    pub fn size(&self, url: &str, bytes: u64) -> Result<(), FetchError> {
        self.policy.check_size(url, bytes).map_err(|r| self.refused(r))
    }

    /// Checks that `need` more bytes fit in `dir`'s filesystem with the margin to spare.
    /// A filesystem that cannot be asked is not a refusal (the write fails on its own).
    pub fn space(&self, url: &str, dir: &Path, need: u64) -> Result<(), FetchError> {
        let Some(free) = free_bytes(dir) else { return Ok(()) };
        self.policy.check_space(url, need, free, dir).map_err(|r| self.refused(r))
    }

    /// Refusals so far, by rule label (every rule, zeros included).
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        Rule::ALL.iter().map(|r| (r.label(), self.refusals[r.index()].load(Ordering::Relaxed))).collect()
    }
}

/// Bytes available to this (unprivileged) process on `dir`'s filesystem.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source_policy::{Context, PolicyFile};

    #[tokio::test]
    async fn refusals_are_counted_by_rule_and_addresses_resolved() {
        let ctx = Context::default();
        let g = Guard::new(Policy::new(&PolicyFile::parse("max_bytes: 10").unwrap(), &ctx).unwrap());
        assert!(matches!(g.source("http://127.0.0.1/x"), Err(FetchError::Refused(_))));
        assert!(
            matches!(g.request("https://127.0.0.1:1/x").await, Err(FetchError::Refused(m)) if m.contains("loopback"))
        );
        assert!(
            matches!(g.request("https://localhost:1/x").await, Err(FetchError::Refused(m)) if m.contains("resolves to"))
        );
        assert!(g.redirect("http://example.com/").await.is_err());
        assert!(g.size("u", 11).is_err());
        let counts: std::collections::BTreeMap<_, _> = g.refusals().into_iter().collect();
        assert_eq!(counts["schemes"], 1);
        assert_eq!(counts["private_networks"], 2);
        assert_eq!(counts["redirect_https"], 1);
        assert_eq!(counts["max_bytes"], 1);
        assert_eq!(counts["hosts"], 0);
        assert_eq!(counts.len(), Rule::ALL.len(), "every rule, zeros included (crate::metrics renders them)");
    }

    #[test]
    fn free_space_is_read() {
        let d = tempfile::tempdir().unwrap();
        assert!(free_bytes(d.path()).is_some_and(|b| b > 0));
        assert!(free_bytes(&d.path().join("missing")).is_none());
        let roomy = Guard::new(Policy::defaults(&Context::default()));
        assert!(roomy.space("u", d.path(), 1).is_ok());
        let huge = PolicyFile::parse("free_space_margin: 16000PiB").unwrap();
        let g = Guard::new(Policy::new(&huge, &Context::default()).unwrap());
        let e = g.space("u", d.path(), 1).unwrap_err().into_message();
        assert!(e.contains("rule free_space_margin") && e.contains("free"), "{e}");
    }
}
