//! gRPC channels to other servers, created lazily and shared (one HTTP/2 connection per
//! peer address, reconnected by tonic when it drops). Addresses go through
//! `FLOTILLA_DIAL_MAP` ([`flotilla_api::dial`]) before dialing.
//!
//! The channels' timeouts come from the Raft timings ([`PeerTimings::from_raft`]), not
//! library defaults: a peer that stops answering (a cut link, a stalled VM) must be given up
//! about as fast as Raft itself gives up on a silent leader, or a request forwarded to it
//! waits out a keep-alive measured in seconds while the majority has long moved on.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Connection timings for server-to-server channels (Raft RPCs and forwarded requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerTimings {
    /// TCP connect timeout.
    pub(crate) connect: Duration,
    /// HTTP/2 PING interval, sent also while idle and while requests are in flight.
    pub(crate) keep_alive_interval: Duration,
    /// A PING not acknowledged within this closes the connection, failing every request on it
    /// with UNAVAILABLE (which the forwarding loops retry against the leader then known).
    pub(crate) keep_alive_timeout: Duration,
}

impl PeerTimings {
    /// From the election timeouts (ms): connect within the maximum election timeout, ping
    /// every minimum election timeout and give up after a maximum one unanswered. A silent
    /// peer is thus detected within `min + max` (600 ms with the defaults 200–400 ms), the
    /// same order as a follower's own detection of a silent leader; a slow but live peer
    /// answers PINGs and is never cut off, however long its requests take.
    pub(crate) fn from_raft(election_timeout_min_ms: u64, election_timeout_max_ms: u64) -> PeerTimings {
        PeerTimings {
            connect: Duration::from_millis(election_timeout_max_ms),
            keep_alive_interval: Duration::from_millis(election_timeout_min_ms),
            keep_alive_timeout: Duration::from_millis(election_timeout_max_ms),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Peers {
    timings: PeerTimings,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// TLS to other servers (our own certificate identifies us as a peer).
    tls: Option<Arc<flotilla_security::Tls>>,
}

/// Turns `host:port` (or a full URL) into an endpoint URL.
pub(crate) fn endpoint_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

impl Peers {
    pub(crate) fn new(timings: PeerTimings, tls: Option<Arc<flotilla_security::Tls>>) -> Peers {
        Peers { timings, channels: Arc::default(), tls }
    }

    pub(crate) fn channel(&self, addr: &str) -> Channel {
        let t = self.timings;
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(addr.to_owned())
            .or_insert_with(|| {
                let endpoint = Endpoint::from_shared(endpoint_url(&flotilla_api::dial::dial_address(addr)))
                    .unwrap_or_else(|_| Endpoint::from_static("http://0.0.0.0:1"))
                    .connect_timeout(t.connect)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(t.keep_alive_interval)
                    .keep_alive_timeout(t.keep_alive_timeout)
                    .keep_alive_while_idle(true);
                flotilla_security::connect::connect_lazy(endpoint, self.tls.as_ref(), addr)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_follow_the_election_timeouts() {
        let t = PeerTimings::from_raft(200, 400);
        assert_eq!(t.connect, Duration::from_millis(400));
        assert_eq!(t.keep_alive_interval, Duration::from_millis(200));
        assert_eq!(t.keep_alive_timeout, Duration::from_millis(400));
        // Slower elections (a WAN deployment) stretch every timeout with them.
        let wan = PeerTimings::from_raft(1000, 2000);
        assert_eq!(wan.keep_alive_interval + wan.keep_alive_timeout, Duration::from_secs(3));
    }
}
