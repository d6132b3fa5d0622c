//! Draining an engine before it is stopped: the leader marks a replica Draining (scale-down,
//! node drain, a move), gateways drop it from their endpoint sets at once, and the agent,
//! once the replica leaves its assignments, waits here until the engine has no running or
//! waiting request before sending SIGTERM. vLLM aborts the requests it still holds when
//! it is stopped, so without this every scale-down cut the streams in flight.
//!
//! ```text
//!  unassigned ─> settle (≥ 1 s: requests already sent reach the engine)
//!            ─> poll /metrics every 200 ms ─> idle / unreachable / timeout ─> SIGTERM
//! ```
//!
//! An engine whose metrics say nothing about its load (no known metric names) is waited on
//! until the timeout: unknown is not idle. One whose `/metrics` no longer answers is gone
//! already. An agent shutting down (`StopMode::Now`) cuts a drain short.

use std::time::Duration;

use flotilla_engine::EngineClient;
use tokio::sync::watch;
use tokio::time::Instant;

use super::engine::SharedReport;

/// How an engine task is asked to end (the value of its stop channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Keep running.
    Run,
    /// Unassigned: drain in-flight requests, then stop.
    Drain,
    /// Stop at once (agent shutdown).
    Now,
}

/// Time given to requests a gateway sent just before it saw the replica Draining.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How often a draining engine's load is read.
pub const POLL: Duration = Duration::from_millis(200);

/// One reading of the engine's load while draining.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// `/metrics` answered with known metric names: requests running + waiting.
    InFlight(f64),
    /// `/metrics` answered, but with no metric this agent knows.
    Unknown,
    /// `/metrics` did not answer: the engine is not serving any more.
    Unreachable,
}

/// What to do after a reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Keep waiting; the reason is published on the engine's report.
    Wait(String),
    /// Stop the engine now, for this reason (logged).
    Stop(String),
}

/// The drain decision for one reading taken `elapsed` after the drain began. Pure.
pub fn step(load: Load, elapsed: Duration, settle: Duration, timeout: Duration) -> Step {
    if elapsed >= timeout {
        return Step::Stop(format!("drain timeout ({timeout:?}) reached; in-flight requests are cut"));
    }
    match load {
        Load::Unreachable => Step::Stop("engine /metrics unreachable; nothing left to drain".into()),
        Load::InFlight(n) if n <= 0.0 && elapsed >= settle => Step::Stop("drained: no request in flight".into()),
        Load::InFlight(n) => Step::Wait(format!("draining: {n} request(s) in flight")),
        Load::Unknown => Step::Wait("draining: engine load unknown, waiting for the drain timeout".into()),
    }
}

/// Waits until the engine at `endpoint` is drained (see [`step`]) or `stop` turns
/// [`StopMode::Now`]. Publishes progress as the report's state `draining`.
pub async fn drain(
    client: &EngineClient,
    endpoint: &str,
    timeout: Duration,
    report: &SharedReport,
    stop: &mut watch::Receiver<StopMode>,
) {
    let began = Instant::now();
    let replica = report.lock().unwrap_or_else(|p| p.into_inner()).replica.clone();
    loop {
        let load = match client.metrics(endpoint).await {
            Ok(m) if m.is_known() => Load::InFlight(m.running + m.waiting),
            Ok(_) => Load::Unknown,
            Err(_) => Load::Unreachable,
        };
        match step(load, began.elapsed(), SETTLE.min(timeout), timeout) {
            Step::Stop(why) => {
                tracing::info!(replica = %replica, after_ms = began.elapsed().as_millis() as u64, "{why}");
                return;
            }
            Step::Wait(why) => {
                let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                r.state = "draining".into();
                r.reason = why;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.wait_for(|m| *m == StopMode::Now) => {
                tracing::info!(replica = %replica, "agent shutting down; drain cut short");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const T: Duration = Duration::from_secs(60);
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn idle_engine_stops_only_after_the_settle_time() {
        assert!(matches!(step(Load::InFlight(0.0), ms(0), S, T), Step::Wait(_)), "requests may still be on the wire");
        assert!(matches!(step(Load::InFlight(0.0), ms(1000), S, T), Step::Stop(_)));
    }

    #[test]
    fn busy_engine_waits_until_idle_or_the_timeout() {
        assert_eq!(step(Load::InFlight(3.0), ms(5000), S, T), Step::Wait("draining: 3 request(s) in flight".into()));
        let Step::Stop(why) = step(Load::InFlight(3.0), ms(60_000), S, T) else { panic!("must stop at the timeout") };
        assert!(why.contains("timeout"), "{why}");
    }

    #[test]
    fn unknown_load_is_not_idle_but_unreachable_is_done() {
        assert!(matches!(step(Load::Unknown, ms(30_000), S, T), Step::Wait(_)));
        assert!(matches!(step(Load::Unknown, ms(60_000), S, T), Step::Stop(_)));
        assert!(matches!(step(Load::Unreachable, ms(0), S, T), Step::Stop(_)));
    }

    #[test]
    fn zero_timeout_stops_at_once() {
        assert!(matches!(step(Load::InFlight(5.0), ms(0), Duration::ZERO, Duration::ZERO), Step::Stop(_)));
    }
}
