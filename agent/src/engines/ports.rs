//! Engine port allocation from `--engine-port-range`: skips ports this agent already gave
//! out and ports something else holds (checked by binding), so a fresh engine gets a free
//! port on every (re)start.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::sync::Mutex;

/// Ports handed to engines.
#[derive(Debug)]
pub struct Ports {
    range: RangeInclusive<u16>,
    host: String,
    used: Mutex<BTreeSet<u16>>,
    next: Mutex<u16>,
}

impl Ports {
    /// Ports from `range`, checked free on `host`. The round-robin starts at a random
    /// point so that several agents on one machine (dev, tests) rarely race for a port.
    pub fn new(range: RangeInclusive<u16>, host: &str) -> Self {
        let span = u128::from(*range.end() - *range.start()) + 1;
        let start = *range.start() + (uuid::Uuid::new_v4().as_u128() % span) as u16;
        Ports { range, host: host.to_string(), used: Mutex::default(), next: Mutex::new(start) }
    }

    /// Marks `port` as taken (an adopted engine's).
    pub fn reserve(&self, port: u16) {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(port);
    }

    /// Returns `port` to the pool.
    pub fn release(&self, port: u16) {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).remove(&port);
    }

    /// A free port, round-robin through the range, or None when every port is taken.
    pub fn allocate(&self) -> Option<u16> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let (lo, hi) = (*self.range.start(), *self.range.end());
        let span = u32::from(hi - lo) + 1;
        for _ in 0..span {
            let port = *next;
            *next = if port >= hi { lo } else { port + 1 };
            if used.contains(&port) || std::net::TcpListener::bind((self.host.as_str(), port)).is_err() {
                continue;
            }
            used.insert(port);
            return Some(port);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_skips_taken_and_busy_ports() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = busy.local_addr().unwrap().port();
        let ports = Ports::new(p..=p.saturating_add(2), "127.0.0.1");
        let a = ports.allocate().unwrap();
        assert!((p..=p + 2).contains(&a));
        assert_ne!(a, p, "a bound port is skipped");
        let b = ports.allocate();
        assert_ne!(Some(a), b);
        ports.release(a);
        ports.reserve(a);
        let single = Ports::new(p..=p, "127.0.0.1");
        assert_eq!(single.allocate(), None);
    }
}
