//! What the controller remembers between ticks, and the grace rules over it. Pure: every
//! method takes the time.
//!
//! - [`Reach`]: whether a cluster's API answers, and since when. A cluster unreachable for
//!   less than the grace is still *available*: its share stays where it is, so a short
//!   partition moves nothing and heals without churn.
//! - [`Shortfall`]: a member Model's replicas that stay Pending (no node with room in that
//!   cluster). Pending past the grace caps the cluster at what it did place, for
//!   [`HOLD_GRACES`] graces, after which the share is tried again: without the hold, the
//!   cap would lift as soon as the lowered count fit, and the share would flap every grace.
//!
//! Both live in the leader's memory: a new leader starts with every cluster reachable "since
//! now" and no caps, so it waits a whole grace before it moves anything.
use std::time::Duration;

use tokio::time::Instant;

/// How many graces a capacity cap holds before the share is tried again.
pub const HOLD_GRACES: u32 = 10;

/// A cluster's reachability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    pub reachable: bool,
    /// When `reachable` last changed (or tracking began).
    pub since: Instant,
}

impl Reach {
    pub fn new(now: Instant) -> Reach {
        Reach { reachable: true, since: now }
    }

    /// Records one probe's outcome.
    pub fn observe(&mut self, reachable: bool, now: Instant) {
        if reachable != self.reachable {
            *self = Reach { reachable, since: now };
        }
    }

    /// Whether the cluster still takes its share: reachable, or not for less than `grace`.
    pub fn available(&self, now: Instant, grace: Duration) -> bool {
        self.reachable || now.duration_since(self.since) < grace
    }
}

/// One member Model's Pending replicas over time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shortfall {
    pending_since: Option<Instant>,
    cap: Option<(u32, Instant)>,
}

impl Shortfall {
    /// Records that the member asked for `asked` replicas, `pending` of them Pending.
    pub fn observe(&mut self, asked: u32, pending: u32, now: Instant, grace: Duration) {
        if pending == 0 {
            self.pending_since = None;
            return;
        }
        let since = *self.pending_since.get_or_insert(now);
        if now.duration_since(since) >= grace {
            let placed = asked.saturating_sub(pending);
            let lower = self.cap.is_none_or(|(c, _)| placed < c);
            if lower {
                self.cap = Some((placed, now + grace * HOLD_GRACES));
            }
        }
    }

    /// The most replicas the cluster takes now (None: no cap).
    pub fn capacity(&mut self, now: Instant) -> Option<u32> {
        match self.cap {
            Some((_, until)) if now >= until => {
                self.cap = None;
                self.pending_since = None;
                None
            }
            Some((c, _)) => Some(c),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn a_short_outage_keeps_the_share_and_a_long_one_moves_it() {
        let t0 = Instant::now();
        let mut r = Reach::new(t0);
        r.observe(false, t0 + Duration::from_secs(1));
        assert!(r.available(t0 + Duration::from_secs(20), GRACE), "within the grace");
        assert!(!r.available(t0 + Duration::from_secs(32), GRACE), "past it");
        r.observe(false, t0 + Duration::from_secs(40));
        assert_eq!(r.since, t0 + Duration::from_secs(1), "the outage's start is kept");
        r.observe(true, t0 + Duration::from_secs(41));
        assert!(r.available(t0 + Duration::from_secs(41), GRACE), "back at once");
    }

    #[test]
    fn pending_past_the_grace_caps_the_cluster_for_the_hold_then_retries() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut s = Shortfall::default();
        s.observe(3, 1, at(0), GRACE);
        assert_eq!(s.capacity(at(10)), None, "pending, not yet for a grace");
        s.observe(3, 1, at(31), GRACE);
        assert_eq!(s.capacity(at(31)), Some(2), "capped at what it placed");
        s.observe(2, 0, at(40), GRACE);
        assert_eq!(s.capacity(at(40)), Some(2), "the cap holds once the lowered count fits");
        assert_eq!(s.capacity(at(31 + 30 * u64::from(HOLD_GRACES))), None, "then the share is tried again");
        s.observe(3, 2, at(400), GRACE);
        s.observe(3, 2, at(420), GRACE);
        assert_eq!(s.capacity(at(420)), None, "a new shortfall waits out its own grace");
        s.observe(3, 2, at(431), GRACE);
        assert_eq!(s.capacity(at(431)), Some(1));
    }
}
