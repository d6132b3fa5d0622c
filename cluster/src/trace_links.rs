//! Trace links from an apply to the controller decision it causes, on the leader.
//!
//! A Model's apply (`server.apply`) and the Model actor that acts on it (`controller.model`)
//! run in the same process but are joined only by the store: the actor sees the new
//! revision through a watch, with no trace context. The apply leaves its `traceparent` here,
//! keyed by the object and the store revision *before* its write; the actor takes it when it
//! reconciles a revision after that one, and its span continues the apply's trace.
//!
//! In memory and best effort: a leader change between the apply and the decision, a
//! decision more than [`MAX_AGE`] later, or more than [`CAPACITY`] applies waiting at once,
//! and the decision starts a trace of its own. Only exported applies leave links (a server
//! without `--otlp-endpoint` records nothing).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use flotilla_api::ObjectKey;

/// Links kept at most; the oldest goes first.
pub const CAPACITY: usize = 1024;
/// A link older than this is dropped unread.
pub const MAX_AGE: Duration = Duration::from_secs(60);

struct Link {
    /// The store revision before the apply's write: only a later revision is its result.
    after: u64,
    traceparent: String,
    at: Instant,
}

/// The pending links, one per object (a newer apply replaces an older one).
#[derive(Default)]
pub struct TraceLinks {
    links: Mutex<HashMap<ObjectKey, Link>>,
}

impl TraceLinks {
    /// Leaves `traceparent` for whoever acts on `key` at a revision above `after`.
    pub fn record(&self, key: ObjectKey, after: u64, traceparent: String) {
        self.record_at(key, after, traceparent, Instant::now());
    }

    fn record_at(&self, key: ObjectKey, after: u64, traceparent: String, now: Instant) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|_, l| now.duration_since(l.at) < MAX_AGE);
        if links.len() >= CAPACITY && !links.contains_key(&key) {
            if let Some(oldest) = links.iter().min_by_key(|(_, l)| l.at).map(|(k, _)| k.clone()) {
                links.remove(&oldest);
            }
        }
        links.insert(key, Link { after, traceparent, at: now });
    }

    /// Forgets `key`'s link (its write went to another server, or failed).
    pub fn forget(&self, key: &ObjectKey) {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// Takes `key`'s link if `revision` is a result of its apply (above the link's `after`)
    /// and the link is fresh. A reconcile of an older revision leaves it for the next one.
    pub fn take(&self, key: &ObjectKey, revision: u64) -> Option<String> {
        self.take_at(key, revision, Instant::now())
    }

    fn take_at(&self, key: &ObjectKey, revision: u64, now: Instant) -> Option<String> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let link = links.get(key)?;
        if now.duration_since(link.at) >= MAX_AGE {
            links.remove(key);
            return None;
        }
        if revision <= link.after {
            return None;
        }
        links.remove(key).map(|l| l.traceparent)
    }

    /// Links waiting.
    pub fn len(&self) -> usize {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::{Kind, ObjectName};

    fn k(name: &str) -> ObjectKey {
        ObjectKey { kind: Kind::Model, name: name.parse::<ObjectName>().unwrap() }
    }

    #[test]
    fn a_link_is_taken_once_by_a_revision_after_the_apply() {
        let links = TraceLinks::default();
        links.record(k("m"), 10, "tp".into());
        assert_eq!(links.take(&k("other"), 11), None);
        assert_eq!(links.take(&k("m"), 10), None, "a reconcile of the revision before the write");
        assert_eq!(links.take(&k("m"), 11).as_deref(), Some("tp"));
        assert_eq!(links.take(&k("m"), 12), None, "taken once");
        assert!(links.is_empty());
    }

    #[test]
    fn a_newer_apply_replaces_the_link_and_forget_drops_it() {
        let links = TraceLinks::default();
        links.record(k("m"), 10, "first".into());
        links.record(k("m"), 12, "second".into());
        assert_eq!(links.take(&k("m"), 11), None);
        assert_eq!(links.take(&k("m"), 13).as_deref(), Some("second"));
        links.record(k("m"), 20, "x".into());
        links.forget(&k("m"));
        assert_eq!(links.take(&k("m"), 21), None);
    }

    #[test]
    fn links_are_bounded_in_age_and_number() {
        let links = TraceLinks::default();
        let t0 = Instant::now();
        links.record_at(k("old"), 1, "old".into(), t0);
        assert_eq!(links.take_at(&k("old"), 2, t0 + MAX_AGE), None, "too old");
        for i in 0..CAPACITY + 10 {
            links.record_at(k(&format!("m{i}")), 1, format!("{i}"), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(links.len(), CAPACITY);
        let end = t0 + Duration::from_millis(CAPACITY as u64 + 10);
        assert_eq!(links.take_at(&k("m0"), 2, end), None, "the oldest went first");
        assert_eq!(
            links.take_at(&k(&format!("m{}", CAPACITY + 9)), 2, end).as_deref(),
            Some(&*format!("{}", CAPACITY + 9))
        );
    }
}
