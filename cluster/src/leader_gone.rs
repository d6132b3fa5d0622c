//! Failover without waiting out the lease when the leader's process is gone.
//!
//! openraft 0.9 lets a follower campaign only `leader_lease + election_timeout` after it last
//! heard its leader (the maximum election timeout plus its own random one: 600–800 ms with
//! the defaults 200–400 ms), and until the lease ends every follower rejects votes. Measured
//! with bench/store: a SIGKILLed leader's cluster took 811 ms (p50) to the next write.
//!
//! Most leader losses in practice are a process that died (a crash, an OOM kill, a restart)
//! on a host that still answers. So when the leader's heartbeats are late ([`LATE`]
//! intervals without an accepted AppendEntries), each follower tries a TCP connection to the
//! leader's Raft address: a **refusal** (the host answers with a reset: nothing listens on
//! the port) means the process is gone, not slow or cut off, and the follower campaigns at
//! once (twice in a row, like [`crate::campaign`]: the first term may collide with the other
//! follower's self-vote). A leader that is only slow accepts the connection; one cut off or
//! whose host is down lets it time out: in both cases nothing happens here and the ordinary
//! timers decide, as before.
//!
//! Safety is Raft's own (an election never breaks it); the refusal is the guard against
//! disruption, and it adds no new kind: a follower whose leader's heartbeats stopped would
//! campaign once the lease ran out anyway (even one cut off from a leader the others still
//! hear, where a firewall answers with resets); this only takes the wait away. When both followers detect the loss in the same few milliseconds their
//! campaigns can collide; openraft's randomized timers then settle it one election timeout
//! later (still sooner than the lease). A probe is a bare TCP connect and close: a TLS peer
//! listener logs it as a refused handshake (rate-limited per address).
use std::io::ErrorKind;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_storage::Raft;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// Heartbeat intervals without an accepted AppendEntries before the leader is probed.
pub(crate) const LATE: u32 = 2;

/// What the watch saw at one tick.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    /// Whether this server is a follower (a voter following a leader).
    pub(crate) follower: bool,
    /// The leader it follows and its term.
    pub(crate) leader: Option<u64>,
    pub(crate) term: u64,
    /// How long since it last accepted AppendEntries or InstallSnapshot (None: never).
    pub(crate) since_leader: Option<Duration>,
    /// How long since its last probe (None: never).
    pub(crate) since_probe: Option<Duration>,
    /// The last term it campaigned in because its leader was gone.
    pub(crate) campaigned_term: Option<u64>,
}

/// The leader to probe now, if any: a follower whose leader has been silent for [`LATE`]
/// heartbeats, not probed within the last heartbeat, and not already campaigned against in
/// this term.
pub(crate) fn probe_due(s: &Seen, heartbeat: Duration) -> Option<u64> {
    let late = s.since_leader.is_some_and(|d| d > heartbeat * LATE);
    let rested = s.since_probe.is_none_or(|d| d >= heartbeat);
    let fresh = s.campaigned_term.is_none_or(|t| t < s.term);
    (s.follower && late && rested && fresh).then_some(s.leader).flatten()
}

/// Whether a connection attempt's outcome says nothing listens at the address.
pub(crate) fn gone(outcome: &std::io::Result<()>) -> bool {
    matches!(outcome, Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

/// Watches this server's leader every half heartbeat until `stop`, campaigning when its
/// process is gone. `leader_contact` is the Raft service's record of the last accepted
/// AppendEntries or InstallSnapshot.
pub(crate) async fn watch(
    raft: Raft,
    id: u64,
    leader_contact: Arc<Mutex<Option<Instant>>>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let heartbeat = Duration::from_millis(raft.config().heartbeat_interval.max(1));
    let mut tick = tokio::time::interval(heartbeat / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_probe, mut campaigned_term): (Option<Instant>, Option<u64>) = (None, None);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (seen, addr) = {
            let m = raft.metrics();
            let m = m.borrow();
            let leader = m.current_leader.filter(|l| *l != id);
            let addr = leader.and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.addr.clone()));
            let seen = Seen {
                follower: m.state == openraft::ServerState::Follower,
                leader,
                term: m.current_term,
                since_leader: leader_contact.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.elapsed()),
                since_probe: last_probe.map(|t| t.elapsed()),
                campaigned_term,
            };
            (seen, addr)
        };
        let (Some(leader), Some(addr)) = (probe_due(&seen, heartbeat), addr) else { continue };
        last_probe = Some(Instant::now());
        let outcome = connect(&addr, heartbeat).await;
        if !gone(&outcome) {
            continue;
        }
        tracing::warn!(leader, %addr, term = seen.term, "the leader's address refuses connections: its process is gone; campaigning now");
        campaigned_term = Some(seen.term);
        metrics.leader_gone();
        for _ in 0..2 {
            if raft.trigger().elect().await.is_err() {
                return;
            }
        }
    }
}

/// A TCP connection to `addr` (`host:port` or a URL, through `FLOTILLA_DIAL_MAP`), closed at
/// once; a timeout is not a refusal.
async fn connect(addr: &str, timeout: Duration) -> std::io::Result<()> {
    let dialed = flotilla_api::dial::dial_address(addr);
    let host_port = dialed.split_once("://").map_or(dialed.as_str(), |(_, rest)| rest).trim_end_matches('/');
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(host_port)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(ErrorKind::TimedOut, "connect timed out")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_millis(50);

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn probes_a_late_leader_once_per_heartbeat_and_campaigns_once_per_term() {
        let late = Seen {
            follower: true,
            leader: Some(1),
            term: 4,
            since_leader: ms(120),
            since_probe: None,
            campaigned_term: None,
        };
        assert_eq!(probe_due(&late, HB), Some(1), "silent for more than two heartbeats");
        assert_eq!(probe_due(&Seen { since_leader: ms(90), ..late }, HB), None, "not late yet");
        assert_eq!(probe_due(&Seen { since_leader: None, ..late }, HB), None, "never heard: the timers decide");
        assert_eq!(probe_due(&Seen { since_probe: ms(20), ..late }, HB), None, "probed within a heartbeat");
        assert_eq!(probe_due(&Seen { since_probe: ms(60), ..late }, HB), Some(1));
        assert_eq!(probe_due(&Seen { follower: false, ..late }, HB), None, "a candidate or leader does not probe");
        assert_eq!(probe_due(&Seen { leader: None, ..late }, HB), None, "no leader to probe");
        assert_eq!(probe_due(&Seen { campaigned_term: Some(4), ..late }, HB), None, "once per term");
        assert_eq!(probe_due(&Seen { campaigned_term: Some(3), ..late }, HB), Some(1), "a new term's leader");
    }

    #[tokio::test]
    async fn only_a_refused_connection_counts_as_gone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = listener.local_addr().unwrap().to_string();
        assert!(!gone(&connect(&live, HB).await), "a listening leader is not gone");
        assert!(!gone(&connect(&format!("http://{live}"), HB).await), "URLs too");
        drop(listener);
        assert!(gone(&connect(&live, HB).await), "nothing listens: gone");
        assert!(!gone(&Err(std::io::Error::new(ErrorKind::TimedOut, "x"))), "a timeout is not a refusal");
    }
}
