//! [`Network`]: the proxies of one cluster keyed by `(from, to)` process names, where `from`
//! dials `to` through the proxy. Scenario steps name processes ("partition s1 from s2, s3");
//! this file turns them into faults on the right links. It is bookkeeping only: the
//! forwarding and the faults themselves live in the proxy.
//!
//! On a link `(from, to)`, bytes from `from` to `to` travel `ClientToServer` and bytes from
//! `to` to `from` travel `ServerToClient`. Raft servers dial each other, so a pair of servers
//! has two links; an agent or a gateway only dials servers, so it has one link per server.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::{Direction, Fault, LinkControl, LinkStats, Proxy};

/// A named set of proxies, one per directed link `(from, to)`.
#[derive(Debug, Default)]
pub struct Network {
    links: BTreeMap<(String, String), Proxy>,
}

impl Network {
    pub fn new() -> Self {
        Network::default()
    }

    /// Starts a proxy named `"{from}->{to}"` on 127.0.0.1 (a free port) forwarding to `target`,
    /// and returns the address `from` must dial to reach `to`. Replaces (and stops) an existing
    /// proxy for the same link.
    pub async fn add_link(&mut self, from: &str, to: &str, target: SocketAddr) -> io::Result<SocketAddr> {
        let name = format!("{from}->{to}");
        let proxy = Proxy::start(&name, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), target).await?;
        let addr = proxy.local_addr();
        self.insert(from, to, proxy);
        Ok(addr)
    }

    /// Adds a proxy started elsewhere for link `(from, to)`; returns the one it replaces.
    pub fn insert(&mut self, from: &str, to: &str, proxy: Proxy) -> Option<Proxy> {
        self.links.insert((from.to_owned(), to.to_owned()), proxy)
    }

    /// The address `from` dials to reach `to`, if that link exists.
    pub fn addr(&self, from: &str, to: &str) -> Option<SocketAddr> {
        self.proxy(from, to).map(Proxy::local_addr)
    }

    /// The control handle of link `(from, to)`, if it exists.
    pub fn link(&self, from: &str, to: &str) -> Option<LinkControl> {
        self.proxy(from, to).map(Proxy::control)
    }

    /// Every link as `(from, to)`, in name order.
    pub fn links(&self) -> impl Iterator<Item = (&str, &str)> {
        self.links.keys().map(|(from, to)| (from.as_str(), to.as_str()))
    }

    /// Sets `fault` on link `(from, to)`; false if there is no such link.
    pub fn set(&self, from: &str, to: &str, fault: Fault) -> bool {
        self.proxy(from, to).map(|proxy| proxy.control().set(fault)).is_some()
    }

    /// Blackholes every link between a member of `group_a` and a member of `group_b`, whichever
    /// side dials. Links within a group are left as they are. Returns how many links it set.
    pub fn partition(&self, group_a: &[&str], group_b: &[&str]) -> usize {
        let crosses = |from: &str, to: &str| {
            (group_a.contains(&from) && group_b.contains(&to)) || (group_b.contains(&from) && group_a.contains(&to))
        };
        self.set_where(crosses, Fault::Blackhole)
    }

    /// Blackholes every link to or from `node`. Returns how many links it set.
    pub fn isolate(&self, node: &str) -> usize {
        self.set_where(|from, to| from == node || to == node, Fault::Blackhole)
    }

    /// Holds back the bytes `from` sends to `to`, on every link between them, while `to`'s
    /// bytes to `from` flow: on link `(from, to)` the client-to-server direction, on link
    /// `(to, from)` the server-to-client one. A link already holding the other direction
    /// becomes a blackhole. Returns how many links it set.
    pub fn one_way(&self, from: &str, to: &str) -> usize {
        let mut set = 0;
        for (dialer, dialed, held) in [(from, to, Direction::ClientToServer), (to, from, Direction::ServerToClient)] {
            if let Some(link) = self.link(dialer, dialed) {
                let fault = match link.fault() {
                    Fault::OneWay(other) if other == held.reverse() => Fault::Blackhole,
                    Fault::Blackhole => Fault::Blackhole,
                    _ => Fault::OneWay(held),
                };
                link.set(fault);
                set += 1;
            }
        }
        set
    }

    /// Delays every byte between `a` and `b` by `latency ± jitter`, on every link between them
    /// (whichever dials) and in both directions, so a round trip between them gains about
    /// `2 × latency`. Returns how many links it set.
    pub fn delay(&self, a: &str, b: &str, latency: Duration, jitter: Duration) -> usize {
        self.set_where(|from, to| (from == a && to == b) || (from == b && to == a), Fault::Delay { latency, jitter })
    }

    /// Clears the fault on every link between `a` and `b`. Returns how many links it cleared.
    pub fn heal(&self, a: &str, b: &str) -> usize {
        self.set_where(|from, to| (from == a && to == b) || (from == b && to == a), Fault::None)
    }

    /// Clears every fault on every link.
    pub fn heal_all(&self) {
        self.set_where(|_, _| true, Fault::None);
    }

    /// Every link's counters, keyed by `(from, to)`.
    pub fn stats(&self) -> BTreeMap<(String, String), LinkStats> {
        self.links.iter().map(|(key, proxy)| (key.clone(), proxy.control().stats())).collect()
    }

    /// Stops every proxy and waits until their connections are closed.
    pub async fn shutdown(self) {
        for proxy in self.links.into_values() {
            proxy.shutdown().await;
        }
    }

    fn proxy(&self, from: &str, to: &str) -> Option<&Proxy> {
        // BTreeMap<(String, String), _> cannot be looked up by (&str, &str) without allocating.
        self.links.get(&(from.to_owned(), to.to_owned()))
    }

    fn set_where(&self, select: impl Fn(&str, &str) -> bool, fault: Fault) -> usize {
        let mut set = 0;
        for ((from, to), proxy) in &self.links {
            if select(from, to) {
                proxy.control().set(fault);
                set += 1;
            }
        }
        set
    }
}
