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

    /// Marks the `n` ports from `first` as taken (an adopted engine's connector ports).
    pub fn reserve_block(&self, first: u16, n: u16) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.extend((0..n).filter_map(|i| first.checked_add(i)));
    }

    /// Returns the `n` ports from `first` to the pool.
    pub fn release_block(&self, first: u16, n: u16) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        for p in (0..n).filter_map(|i| first.checked_add(i)) {
            used.remove(&p);
        }
    }

    /// The first of `n` consecutive free ports (vLLM's connectors add a rank to a base
    /// port), round-robin through the range; None when no such run is free or `n` is 0.
    pub fn allocate_block(&self, n: u16) -> Option<u16> {
        let (lo, hi) = (*self.range.start(), *self.range.end());
        if n == 0 || u32::from(hi - lo) + 1 < u32::from(n) {
            return None;
        }
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let last_start = hi - (n - 1);
        for _ in 0..=u32::from(last_start - lo) {
            let start = if *next > last_start { lo } else { *next };
            *next = if start >= last_start { lo } else { start + 1 };
            let free = (start..=start + (n - 1))
                .all(|p| !used.contains(&p) && std::net::TcpListener::bind((self.host.as_str(), p)).is_ok());
            if free {
                used.extend(start..=start + (n - 1));
                *next = if start + (n - 1) >= hi { lo } else { start + n };
                return Some(start);
            }
        }
        None
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

    #[test]
    fn blocks_are_consecutive_free_and_released() {
        // a range of 6 ports, its third bound by someone else: lo, lo+1 | busy | lo+3..lo+5
        // Every other port of the range must be free just now: tests beside this one open
        // sockets in the same range (a run where lo+3 was in use failed here).
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        let (lo, busy) = loop {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let lo = probe.local_addr().unwrap().port();
            drop(probe);
            if !(1024..=60000).contains(&lo) || ![lo, lo + 1, lo + 3, lo + 4, lo + 5].into_iter().all(free) {
                continue;
            }
            if let Ok(b) = std::net::TcpListener::bind(("127.0.0.1", lo + 2)) {
                break (lo, b);
            }
        };
        let ports = Ports::new(lo..=lo + 5, "127.0.0.1");
        for _ in 0..3 {
            let first = ports.allocate_block(3).expect("a run of 3 after the bound port");
            assert_eq!(first, lo + 3, "the only run of 3 free ports skips the bound one");
            assert_eq!(ports.allocate_block(3), None, "taken: none left");
            assert_eq!(ports.allocate_block(2), Some(lo), "the run before the bound port");
            assert_eq!(ports.allocate_block(1), None);
            ports.release_block(lo, 2);
            ports.release_block(first, 3);
        }
        assert_eq!(ports.allocate_block(0), None);
        assert_eq!(ports.allocate_block(7), None, "longer than the range");
        ports.reserve_block(lo + 3, 3);
        assert_eq!(ports.allocate_block(3), None, "reserved (an adopted engine's)");
        let one = ports.allocate().expect("a single port is left");
        assert!(one == lo || one == lo + 1, "{one}: not the bound or a reserved port");
        drop(busy);
    }
}
