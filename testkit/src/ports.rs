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

/// How long a port handed out by any process on this machine stays reserved in [`LEDGER`].
const RESERVED_MS: u64 = 120_000;

/// A ledger shared by every process on the machine (`<tmp>/flotilla-test-ports-v1`, lines
/// `PORT UNIX_MS`, under an exclusive file lock): ports handed out within [`RESERVED_MS`].
/// Separate processes pick ports too — each chaos run is its own `flotilla chaos` process, and
/// test binaries run beside each other — and two of them found the same port free before
/// either's server bound it (CI: a chaos server failed with "address already in use"). A
/// fixed path on purpose: it is the one thing they must share.
const LEDGER: &str = "flotilla-test-ports-v1";

/// Records `port` in the machine-wide ledger unless another process holds it; true when it
/// is ours. A ledger that cannot be used (no temp dir, no locking) claims nothing and says
/// true: the per-process set and the bind check still apply.
fn claim_machine_wide(port: u16) -> bool {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = std::env::temp_dir().join(LEDGER);
    let Ok(mut f) = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path) else {
        return true;
    };
    if f.lock().is_err() {
        return true;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    let live: Vec<(u16, u64)> = text
        .lines()
        .filter_map(|l| l.split_once(' ').and_then(|(p, t)| Some((p.parse().ok()?, t.parse().ok()?))))
        .filter(|(_, t): &(u16, u64)| now.saturating_sub(*t) < RESERVED_MS)
        .collect();
    if live.iter().any(|(p, _)| *p == port) {
        return false;
    }
    let mut out: String = live.iter().map(|(p, t)| format!("{p} {t}\n")).collect();
    out.push_str(&format!("{port} {now}\n"));
    let _ = f.set_len(0).and_then(|()| f.rewind()).and_then(|()| f.write_all(out.as_bytes()));
    true
}

/// A free loopback port from [`RANGE`]: one that could be bound just now, that this process
/// has not handed out before, and that no other process on the machine took in the last
/// [`RESERVED_MS`].
pub fn free_port() -> std::io::Result<u16> {
    let mut rng = rand::rng();
    let mut taken = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..200 {
        let port = rng.random_range(RANGE);
        if !taken.contains(&port)
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && claim_machine_wide(port)
        {
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

    #[test]
    fn another_process_never_gets_a_port_handed_out_here() {
        // The ledger is what a second process reads: a port claimed here is refused there.
        let port = free_port().unwrap();
        assert!(!claim_machine_wide(port), "{port} is in the machine-wide ledger");
    }
}
