//! Free loopback ports for processes a test or a chaos run is about to start.

use rand::Rng as _;

/// The range ports are drawn from: below the kernel's ephemeral range (where outgoing
/// connections take their source ports, and where a port picked by binding port 0 and
/// released was taken again before the server bound it, in a chaos soak) and below the
/// agents' engine ports (20000+).
pub const RANGE: std::ops::Range<u16> = 15000..20000;

/// A free loopback port from [`RANGE`]: one that could be bound just now.
pub fn free_port() -> std::io::Result<u16> {
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(RANGE);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
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
}
