//! Free loopback ports for processes a test or a chaos run is about to start.

use rand::Rng as _;

/// The range ports are drawn from: below the kernel's ephemeral range (where outgoing
/// connections take their source ports, and where a port picked by binding port 0 and
/// released was taken again before the server bound it, in a chaos soak) and below the
/// agents' engine ports (20000+).
pub const RANGE: std::ops::Range<u16> = 15000..20000;

/// Ports this process handed out already: tests of one binary run in parallel, and two of
/// them could otherwise both find a port free before either's server binds it (a chaos
/// run's server then failed with "address already in use").
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// A free loopback port from [`RANGE`]: one that could be bound just now and that this
/// process has not handed out before.
pub fn free_port() -> std::io::Result<u16> {
    let mut rng = rand::rng();
    let mut taken = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..200 {
        let port = rng.random_range(RANGE);
        if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    Err(std::io::Error::other(format!("no free port in {}-{}", RANGE.start, RANGE.end - 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_is_in_range_and_bindable() {
        let port = free_port().expect("a free port");
        assert!(RANGE.contains(&port), "{port}");
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("still free");
    }

    #[test]
    fn a_port_is_handed_out_once_per_process() {
        // Without binding them in between, 500 picks are all different: the same port
        // never goes to two tests of one binary.
        let ports: std::collections::BTreeSet<u16> = (0..500).map(|_| free_port().unwrap()).collect();
        assert_eq!(ports.len(), 500);
    }
}
