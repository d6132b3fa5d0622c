//! Outbound address rewriting: with `FLOTILLA_DIAL_MAP="ADDR=VIA,ADDR2=VIA2"` a process dials
//! `VIA` whenever it would dial `ADDR` — a configured server, a Raft peer's advertised
//! address, or a leader hint. For deployments behind NAT or port forwarding, and for the
//! chaos harness, which puts a fault-injecting proxy on every link between processes (each
//! process gets its own map, so server 1's link to server 2 and server 3's link to server 2
//! are different proxies). Unset, nothing is rewritten.
//!
//! The map is read from the environment once per process; [`check_env`] lets a command
//! reject a malformed map at start-up (exit code 2) instead of ignoring it.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// HTTP/2 PING interval of the clients that follow the leader: agents' sessions and
/// gateways' watches and calls. A leader that is cut off (a switch, a NIC, a stalled VM)
/// closes nothing: these pings are how its clients notice, and they move on once one is not
/// answered within [`LEADER_PING_TIMEOUT`] — within 0.75 s, about when the majority has
/// elected a successor (election timeouts 200–400 ms), so a silent leader is left about as
/// fast as a dead one. The cost is one PING frame per client every 250 ms (4,000/s at a
/// leader with 1,000 agents, each a few dozen bytes).
pub const LEADER_PING_INTERVAL: Duration = Duration::from_millis(250);
/// See [`LEADER_PING_INTERVAL`].
pub const LEADER_PING_TIMEOUT: Duration = Duration::from_millis(500);

/// The environment variable holding the map.
pub const DIAL_MAP_ENV: &str = "FLOTILLA_DIAL_MAP";

/// Parses `ADDR=VIA[,ADDR=VIA...]` (`host:port` each; whitespace around entries ignored).
pub fn parse_dial_map(text: &str) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (from, to) =
            entry.split_once('=').ok_or_else(|| format!("{DIAL_MAP_ENV} entry {entry:?} is not ADDR=VIA"))?;
        let (from, to) = (strip_scheme(from.trim()), strip_scheme(to.trim()));
        for a in [from, to] {
            if !a.contains(':') || a.starts_with(':') || a.ends_with(':') {
                return Err(format!("{DIAL_MAP_ENV} entry {entry:?}: {a:?} is not host:port"));
            }
        }
        if map.insert(from.to_string(), to.to_string()).is_some() {
            return Err(format!("{DIAL_MAP_ENV} maps {from:?} twice"));
        }
    }
    Ok(map)
}

fn strip_scheme(a: &str) -> &str {
    a.strip_prefix("http://").or_else(|| a.strip_prefix("https://")).unwrap_or(a)
}

fn env_map() -> &'static HashMap<String, String> {
    static MAP: OnceLock<HashMap<String, String>> = OnceLock::new();
    MAP.get_or_init(|| std::env::var(DIAL_MAP_ENV).ok().and_then(|t| parse_dial_map(&t).ok()).unwrap_or_default())
}

/// Fails with a sentence naming the bad entry when the environment's map is malformed.
pub fn check_env() -> Result<(), String> {
    match std::env::var(DIAL_MAP_ENV) {
        Ok(t) => parse_dial_map(&t).map(|_| ()),
        Err(_) => Ok(()),
    }
}

/// `addr` rewritten by `map`; a scheme (`http://`) is kept.
pub fn rewrite(map: &HashMap<String, String>, addr: &str) -> String {
    let (scheme, rest) = match addr.find("://") {
        Some(i) => addr.split_at(i + 3),
        None => ("", addr),
    };
    match map.get(rest.trim_end_matches('/')) {
        Some(via) => format!("{scheme}{via}"),
        None => addr.to_string(),
    }
}

/// The address to actually dial for `addr`, per `FLOTILLA_DIAL_MAP`.
pub fn dial_address(addr: &str) -> String {
    rewrite(env_map(), addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rewrites_keeping_the_scheme() {
        let m = parse_dial_map(" 127.0.0.1:7070=127.0.0.1:9001, http://10.0.0.2:7070=127.0.0.1:9002 ,").unwrap();
        assert_eq!(rewrite(&m, "127.0.0.1:7070"), "127.0.0.1:9001");
        assert_eq!(rewrite(&m, "http://127.0.0.1:7070"), "http://127.0.0.1:9001");
        assert_eq!(rewrite(&m, "http://10.0.0.2:7070/"), "http://127.0.0.1:9002");
        assert_eq!(rewrite(&m, "127.0.0.1:7071"), "127.0.0.1:7071");
        assert!(parse_dial_map("").unwrap().is_empty());
    }

    #[test]
    fn malformed_maps_name_the_entry() {
        assert!(parse_dial_map("a:1").unwrap_err().contains("\"a:1\""));
        assert!(parse_dial_map("a:1=b").unwrap_err().contains("not host:port"));
        assert!(parse_dial_map("a:1=b:2,a:1=c:3").unwrap_err().contains("twice"));
    }
}
