//! Certificate pins for engines that serve TLS with a self-signed certificate: the agent makes
//! one per engine and reports its SHA-256 ([`CertFingerprint`]) with the endpoint, so a client
//! trusts exactly that certificate and no CA has to be distributed. [`EnginePins`] is the
//! shared set a client's TLS verifier (`crate::tls`) looks in: certificate fingerprints
//! allowed per dialled host.
//!
//! ```text
//!  gateway: endpoint watch ──replace(all endpoints)──┐
//!  agent:   engine task ─────hold(host, pin)─────────┴─> EnginePins: host -> {sha256} <── verifier
//! ```
//!
//! Pins are keyed by host (IP in its canonical form, or a lower-case DNS name), not by
//! port: a TLS verifier learns the name it dialled, not the port. Engines on one host are
//! one agent's, so one of them answering on another's port gains nothing the agent could not
//! give it anyway. Pure (no I/O); the two feeds are kept apart, so a gateway's table
//! replacement never drops a pin an agent holds and the reverse.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

/// The SHA-256 of a certificate's DER encoding; written as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CertFingerprint([u8; 32]);

impl CertFingerprint {
    /// The fingerprint of the certificate `der`.
    pub fn of_der(der: &[u8]) -> CertFingerprint {
        CertFingerprint(Sha256::digest(der).into())
    }

    /// 64 lower-case hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for CertFingerprint {
    type Err = String;

    /// 64 hex digits (either case).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 32];
        match hex::decode_to_slice(s, &mut out) {
            Ok(()) => Ok(CertFingerprint(out)),
            Err(_) => Err(format!("{s:?} is not a SHA-256 fingerprint (64 hex digits)")),
        }
    }
}

impl fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertFingerprint({})", self.hex())
    }
}

/// A host as pins are keyed: an IP address in its canonical text (IPv6 without brackets,
/// IPv4-mapped forms left as they are), a DNS name in lower case without a trailing dot.
/// None for an empty host.
pub fn pin_host(host: &str) -> Option<String> {
    let h = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let h = h.trim_end_matches('.').to_ascii_lowercase();
    (!h.is_empty()).then_some(h)
}

/// The pin key of an endpoint `host:port` (`[v6]:port`); None when it is not one.
pub fn endpoint_host(endpoint: &str) -> Option<String> {
    let authority: http::uri::Authority = endpoint.parse().ok()?;
    authority.port_u16()?;
    pin_host(authority.host())
}

#[derive(Debug, Default)]
struct Table {
    /// Replaced whole ([`EnginePins::replace`]): a gateway's endpoint table.
    replaced: HashMap<String, HashSet<CertFingerprint>>,
    /// Held one by one ([`EnginePins::hold`]), counted: an agent's running engines.
    held: HashMap<(String, CertFingerprint), usize>,
}

/// The certificates a client accepts, per dialled host. Cheap to clone; clones share the set.
#[derive(Clone, Default)]
pub struct EnginePins(Arc<RwLock<Table>>);

impl fmt::Debug for EnginePins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.read();
        f.debug_struct("EnginePins").field("replaced", &t.replaced.len()).field("held", &t.held.len()).finish()
    }
}

impl EnginePins {
    /// An empty set.
    pub fn new() -> EnginePins {
        EnginePins::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the replaced part with these `(endpoint host:port, fingerprint)` pairs
    /// (endpoints that are not `host:port` are skipped). Pins held with [`Self::hold`] stay.
    pub fn replace<'a>(&self, pins: impl IntoIterator<Item = (&'a str, CertFingerprint)>) {
        let mut next: HashMap<String, HashSet<CertFingerprint>> = HashMap::new();
        for (endpoint, fp) in pins {
            if let Some(host) = endpoint_host(endpoint) {
                next.entry(host).or_default().insert(fp);
            }
        }
        self.write().replaced = next;
    }

    /// Allows `fp` for `host` (an IP or DNS name, or `host:port`) until the returned hold is
    /// dropped. None when `host` is empty.
    pub fn hold(&self, host: &str, fp: CertFingerprint) -> Option<PinHold> {
        let key = endpoint_host(host).or_else(|| pin_host(host))?;
        *self.write().held.entry((key.clone(), fp)).or_default() += 1;
        Some(PinHold { pins: self.clone(), key: (key, fp) })
    }

    /// Whether a certificate with fingerprint `fp` may answer for `host` (as [`pin_host`]
    /// writes it).
    pub fn allows(&self, host: &str, fp: &CertFingerprint) -> bool {
        let t = self.read();
        t.replaced.get(host).is_some_and(|s| s.contains(fp)) || t.held.contains_key(&(host.to_string(), *fp))
    }

    /// Every fingerprint allowed for `host`, sorted (for error messages).
    pub fn pinned(&self, host: &str) -> Vec<CertFingerprint> {
        let t = self.read();
        let mut out: Vec<CertFingerprint> = t.replaced.get(host).into_iter().flatten().copied().collect();
        out.extend(t.held.keys().filter(|(h, _)| h == host).map(|(_, fp)| *fp));
        out.sort();
        out.dedup();
        out
    }
}

/// A pin held in an [`EnginePins`] set; dropping it releases the pin.
#[derive(Debug)]
pub struct PinHold {
    pins: EnginePins,
    key: (String, CertFingerprint),
}

impl Drop for PinHold {
    fn drop(&mut self) {
        let mut t = self.pins.write();
        if let Some(n) = t.held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                t.held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> CertFingerprint {
        CertFingerprint([b; 32])
    }

    #[test]
    fn fingerprints_are_sha256_of_the_der_in_hex() {
        let f = CertFingerprint::of_der(b"abc");
        assert_eq!(f.hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(f.hex().parse::<CertFingerprint>(), Ok(f));
        assert_eq!(f.hex().to_uppercase().parse::<CertFingerprint>(), Ok(f));
        for bad in ["", "ab", &"g".repeat(64), &"a".repeat(63), &"a".repeat(66), "sha256:ab"] {
            assert!(bad.parse::<CertFingerprint>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hosts_are_keyed_canonically() {
        for (input, want) in [
            ("10.0.0.1", Some("10.0.0.1")),
            ("[::1]", Some("::1")),
            ("[0:0:0:0:0:0:0:1]", Some("::1")),
            ("Engine.Example.", Some("engine.example")),
            ("", None),
        ] {
            assert_eq!(pin_host(input).as_deref(), want, "{input}");
        }
        assert_eq!(endpoint_host("10.0.0.1:20000").as_deref(), Some("10.0.0.1"));
        assert_eq!(endpoint_host("[::1]:20000").as_deref(), Some("::1"));
        assert_eq!(endpoint_host("LocalHost:1").as_deref(), Some("localhost"));
        assert_eq!(endpoint_host("10.0.0.1"), None, "no port");
        assert_eq!(endpoint_host("a b:1"), None);
    }

    #[test]
    fn replaced_and_held_pins_live_side_by_side() {
        let pins = EnginePins::new();
        pins.replace([("10.0.0.1:20000", fp(1)), ("10.0.0.1:20001", fp(2)), ("bad", fp(9))]);
        assert!(pins.allows("10.0.0.1", &fp(1)) && pins.allows("10.0.0.1", &fp(2)));
        assert!(!pins.allows("10.0.0.1", &fp(3)) && !pins.allows("10.0.0.2", &fp(1)));
        let a = pins.hold("10.0.0.2", fp(3)).unwrap();
        let b = pins.hold("10.0.0.2:9", fp(3)).unwrap();
        assert!(pins.hold("", fp(3)).is_none());
        pins.replace([("10.0.0.1:20000", fp(1))]);
        assert!(!pins.allows("10.0.0.1", &fp(2)), "an endpoint gone from the table loses its pin");
        assert!(pins.allows("10.0.0.2", &fp(3)), "a replacement keeps held pins");
        assert_eq!(pins.pinned("10.0.0.2"), vec![fp(3)]);
        drop(a);
        assert!(pins.allows("10.0.0.2", &fp(3)), "held twice, released once");
        drop(b);
        assert!(!pins.allows("10.0.0.2", &fp(3)));
        assert!(pins.pinned("10.0.0.2").is_empty());
        let clone = pins.clone();
        clone.replace([]);
        assert!(!pins.allows("10.0.0.1", &fp(1)), "clones share the set");
    }
}
