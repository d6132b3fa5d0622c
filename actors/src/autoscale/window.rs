//! A time series of one signal: samples `(t_ms, value)` in time order, averaged over the
//! last `D` ms. No sample in the span means unknown (`None`), never zero.
use std::collections::VecDeque;

/// Samples of one signal, oldest first. Time is the caller's monotonic milliseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    samples: VecDeque<(u64, f64)>,
}

impl Window {
    pub fn new() -> Self {
        Window::default()
    }

    /// Appends a sample. A non-finite or negative value, or one older than the newest
    /// sample, is dropped; one at the newest sample's time replaces it.
    pub fn push(&mut self, t_ms: u64, value: f64) {
        if !value.is_finite() || value < 0.0 {
            return;
        }
        match self.samples.back_mut() {
            Some(last) if last.0 > t_ms => {}
            Some(last) if last.0 == t_ms => last.1 = value,
            _ => self.samples.push_back((t_ms, value)),
        }
    }

    /// Drops samples older than `before_ms`.
    pub fn prune(&mut self, before_ms: u64) {
        while self.samples.front().is_some_and(|s| s.0 < before_ms) {
            self.samples.pop_front();
        }
    }

    fn span(&self, now_ms: u64, over_ms: u64) -> impl Iterator<Item = f64> + '_ {
        let end = self.samples.partition_point(|s| s.0 <= now_ms);
        let start = self.samples.partition_point(|s| s.0.saturating_add(over_ms) <= now_ms);
        self.samples.range(start.min(end)..end).map(|s| s.1)
    }

    /// Mean of the samples in `(now − over, now]`, or `None` when there are none.
    pub fn average(&self, now_ms: u64, over_ms: u64) -> Option<f64> {
        let (n, sum) = self.span(now_ms, over_ms).fold((0u32, 0.0), |(n, s), v| (n + 1, s + v));
        (n > 0).then(|| sum / f64::from(n))
    }

    /// Largest sample in `(now − over, now]`.
    pub fn max(&self, now_ms: u64, over_ms: u64) -> Option<f64> {
        self.span(now_ms, over_ms).reduce(f64::max)
    }

    /// The newest sample at or before `now_ms`.
    pub fn latest(&self, now_ms: u64) -> Option<(u64, f64)> {
        let i = self.samples.partition_point(|s| s.0 <= now_ms);
        i.checked_sub(1).map(|i| self.samples[i])
    }

    /// The times of the samples in `(now − over, now]`, newest first.
    pub fn times(&self, now_ms: u64, over_ms: u64) -> impl Iterator<Item = u64> + '_ {
        self.samples
            .iter()
            .rev()
            .skip_while(move |s| s.0 > now_ms)
            .take_while(move |s| s.0.saturating_add(over_ms) > now_ms)
            .map(|s| s.0)
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_over_the_span_and_knows_when_it_knows_nothing() {
        let mut w = Window::new();
        assert_eq!(w.average(1000, 60_000), None);
        for (t, v) in [(1000, 2.0), (2000, 4.0), (3000, 6.0)] {
            w.push(t, v);
        }
        assert_eq!(w.average(3000, 60_000), Some(4.0));
        assert_eq!(w.average(3000, 1500), Some(5.0), "(1500, 3000]");
        assert_eq!(w.average(3000, 1000), Some(6.0));
        assert_eq!(w.average(70_000, 60_000), None, "all samples are older than the span");
        assert_eq!(w.average(2500, 60_000), Some(3.0), "samples after now are ignored");
        assert_eq!(w.max(3000, 60_000), Some(6.0));
        assert_eq!(w.latest(2500), Some((2000, 4.0)));
        assert_eq!(w.latest(999), None);
        assert_eq!(w.times(3000, 1500).collect::<Vec<_>>(), [3000, 2000]);
        w.push(500, 100.0);
        w.push(3000, 8.0);
        w.push(4000, f64::NAN);
        w.push(4000, -1.0);
        assert_eq!(w.len(), 3);
        assert_eq!(w.latest(9000), Some((3000, 8.0)));
        w.prune(2000);
        assert_eq!(w.len(), 2);
        w.prune(10_000);
        assert!(w.is_empty());
    }
}
