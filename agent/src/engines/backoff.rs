//! The crash policy: after each engine crash, restart after an exponential delay, or give
//! up (`failed`) when too many crashes fall within a window. Pure; unit-tested with
//! explicit instants.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How crashes are handled.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    /// Delay before the first restart; doubles per consecutive crash.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// An engine that ran at least this long before crashing starts the doubling afresh.
    pub stable_after: Duration,
    /// This many crashes within `window` → give up.
    pub max_crashes: u32,
    /// Window for `max_crashes`.
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
            max_crashes: 5,
            window: Duration::from_secs(300),
        }
    }
}

/// What to do after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCrash {
    /// Restart after this delay.
    Restart(Duration),
    /// Stop trying; report `failed`.
    GiveUp,
}

/// One engine's crash record.
#[derive(Debug, Default, Clone)]
pub struct CrashHistory {
    crashes: VecDeque<Instant>,
    consecutive: u32,
}

impl CrashHistory {
    /// Records a crash at `now` of an engine started at `started_at` and decides.
    pub fn on_crash(&mut self, policy: &RestartPolicy, started_at: Instant, now: Instant) -> AfterCrash {
        if now.saturating_duration_since(started_at) >= policy.stable_after {
            self.consecutive = 0;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        self.crashes.push_back(now);
        while self.crashes.front().is_some_and(|t| now.saturating_duration_since(*t) > policy.window) {
            self.crashes.pop_front();
        }
        if self.crashes.len() >= policy.max_crashes as usize {
            return AfterCrash::GiveUp;
        }
        let factor = 1u32.checked_shl(self.consecutive.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
        AfterCrash::Restart(policy.initial.saturating_mul(factor).min(policy.max))
    }

    /// Crashes within the window as of the last record.
    pub fn recent(&self) -> usize {
        self.crashes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy { max_crashes: 6, ..RestartPolicy::default() }
    }

    #[test]
    fn delays_double_up_to_the_cap_then_give_up() {
        let p = policy();
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        let delays: Vec<_> = (0..5)
            .map(|i| {
                h.on_crash(&p, t0 + Duration::from_secs(i), t0 + Duration::from_secs(i) + Duration::from_millis(10))
            })
            .collect();
        let secs = |s| AfterCrash::Restart(Duration::from_secs(s));
        assert_eq!(delays, vec![secs(1), secs(2), secs(4), secs(8), secs(16)]);
        assert_eq!(h.on_crash(&p, t0 + Duration::from_secs(6), t0 + Duration::from_secs(7)), AfterCrash::GiveUp);
    }

    #[test]
    fn cap_applies() {
        let p = RestartPolicy { max_crashes: 100, ..policy() };
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        let mut last = AfterCrash::GiveUp;
        for _ in 0..10 {
            last = h.on_crash(&p, t0, t0);
        }
        assert_eq!(last, AfterCrash::Restart(Duration::from_secs(30)));
    }

    #[test]
    fn stable_run_resets_backoff_and_old_crashes_expire() {
        let p = policy();
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        for _ in 0..4 {
            h.on_crash(&p, t0, t0);
        }
        // Ran 2 minutes: backoff resets; 10 minutes later the old crashes are out of the window.
        let start = t0 + Duration::from_secs(600);
        let d = h.on_crash(&p, start, start + Duration::from_secs(120));
        assert_eq!(d, AfterCrash::Restart(Duration::from_secs(1)));
        assert_eq!(h.recent(), 1);
    }
}
