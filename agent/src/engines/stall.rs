//! Stall detection (pure): a live engine that holds running requests but whose token
//! counters (generated + prompt, so a long prefill is progress) do not move for the stall
//! timeout is stuck (a wedged GPU kernel, a
//! deadlocked scheduler) even though its `/health` may still answer. The engine task feeds
//! every known scrape here and restarts the engine, as a crash, when it says so. Counters
//! that read 0 are taken as not exported (unknown is not stalled).
//!
//! ```text
//!  scrape (running, generation_tokens_total) ──observe──> None | Some(stalled for)
//! ```
use std::time::Duration;

use tokio::time::Instant;

/// What the watch remembers between scrapes.
#[derive(Debug, Clone, Default)]
pub struct StallWatch {
    last_tokens: Option<f64>,
    /// Since when requests ran with no new tokens.
    since: Option<Instant>,
}

impl StallWatch {
    /// Feeds one scrape taken at `now`; returns how long the engine has been stalled once
    /// that reaches `timeout` (`None`: stall detection off).
    pub fn observe(&mut self, running: f64, tokens: f64, now: Instant, timeout: Option<Duration>) -> Option<Duration> {
        let moved = tokens <= 0.0 || self.last_tokens.is_none_or(|t| tokens != t);
        self.last_tokens = Some(tokens);
        if running <= 0.0 || moved {
            self.since = None;
            return None;
        }
        let since = *self.since.get_or_insert(now);
        let stalled = now.saturating_duration_since(since);
        timeout.filter(|t| stalled >= *t).map(|_| stalled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Option<Duration> = Some(Duration::from_secs(10));

    #[test]
    fn running_requests_without_new_tokens_for_the_timeout_is_a_stall() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = StallWatch::default();
        assert_eq!(w.observe(2.0, 100.0, at(0), T), None, "first scrape: nothing to compare");
        assert_eq!(w.observe(2.0, 100.0, at(1), T), None, "stalled since 1 s");
        assert_eq!(w.observe(2.0, 100.0, at(10), T), None, "9 s");
        assert_eq!(w.observe(2.0, 100.0, at(11), T), Some(Duration::from_secs(10)));
    }

    #[test]
    fn progress_or_idleness_resets_the_clock_and_zero_timeout_is_off() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = StallWatch::default();
        w.observe(2.0, 100.0, at(0), T);
        w.observe(2.0, 100.0, at(5), T);
        assert_eq!(w.observe(2.0, 101.0, at(9), T), None, "a token resets");
        assert_eq!(w.observe(2.0, 101.0, at(18), T), None, "9 s since the last token");
        assert_eq!(w.observe(0.0, 101.0, at(30), T), None, "idle is not stalled");
        assert_eq!(w.observe(1.0, 101.0, at(31), T), None);
        assert_eq!(w.observe(1.0, 101.0, at(40), T), None);
        assert_eq!(w.observe(1.0, 50.0, at(50), T), None, "a counter reset (restart) is movement");
        let mut off = StallWatch::default();
        for s in 0..100 {
            assert_eq!(off.observe(3.0, 7.0, at(s), None), None);
        }
        let mut unknown = StallWatch::default();
        for s in 0..100 {
            assert_eq!(unknown.observe(3.0, 0.0, at(s), T), None, "no token counters exported");
        }
    }
}
