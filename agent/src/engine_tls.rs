//! TLS between gateways (and this agent) and the engines it starts (`--engine-tls`): each
//! engine gets its own self-signed certificate for the node's `--address`, written with its
//! key into the engine's private directory, and is started with vLLM's `--ssl-certfile` and
//! `--ssl-keyfile` (the sim takes the same flags). The certificate's SHA-256 is its pin: it
//! is reported with the endpoint and kept in the state file, so an adopted engine keeps it,
//! and clients accept that certificate and no other (`flotilla_engine::tls`). No CA.
//!
//! ```text
//!  <data-dir>/engines/            0700
//!      <replica>/                 0700, removed when the engine is stopped for good
//!          tls-cert.pem           0600
//!          tls-key.pem            0600
//! ```
//!
//! [`EngineTlsMode::Auto`] (the default) turns it on unless `--address` is loopback: engines
//! reachable from this machine only (`flotilla dev`, tests) stay plain HTTP.

use std::path::{Path, PathBuf};

use flotilla_engine::CertFingerprint;

use crate::state::write_atomic;

/// `--engine-tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EngineTlsMode {
    /// On unless --address is loopback.
    #[default]
    Auto,
    /// Every engine this agent starts serves TLS.
    On,
    /// Engines serve plain HTTP.
    Off,
}

impl EngineTlsMode {
    /// Whether engines listening on `address` (an IP or `localhost`) serve TLS. Pure.
    pub fn enabled(self, address: &str) -> bool {
        match self {
            EngineTlsMode::On => true,
            EngineTlsMode::Off => false,
            EngineTlsMode::Auto => {
                !(address == "localhost" || address.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()))
            }
        }
    }
}

/// How long an engine's certificate is valid. Clients trust it by its pin, not by dates; a
/// long validity only matters to tools that check it (`curl --cacert`).
pub const CERT_DAYS: i64 = 3650;

/// An engine's certificate files and pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineCert {
    /// PEM certificate (`--ssl-certfile`).
    pub cert: PathBuf,
    /// PEM private key (`--ssl-keyfile`).
    pub key: PathBuf,
    /// SHA-256 of the certificate's DER.
    pub pin: CertFingerprint,
}

/// `<data-dir>/engines/<replica>`, or an error when the replica's name could leave that dir.
pub fn engine_dir(data_dir: &Path, replica: &str) -> Result<PathBuf, String> {
    let safe = !replica.is_empty()
        && replica != "."
        && replica != ".."
        && replica.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !safe {
        return Err(format!("replica name {replica:?} cannot name a directory"));
    }
    Ok(data_dir.join("engines").join(replica))
}

/// The files of `replica`'s engine, pinned to `pin` (an adopted engine's, from the state
/// file: the running process loaded them when it started). No I/O.
pub fn adopted_cert(data_dir: &Path, replica: &str, pin: CertFingerprint) -> Result<EngineCert, String> {
    let dir = engine_dir(data_dir, replica)?;
    Ok(EngineCert { cert: dir.join("tls-cert.pem"), key: dir.join("tls-key.pem"), pin })
}

/// Makes a new certificate for an engine reached at `host` and writes it into the engine's
/// private directory (blocking: key generation and fsync'd writes).
pub fn create(data_dir: &Path, replica: &str, host: &str) -> Result<EngineCert, String> {
    let dir = engine_dir(data_dir, replica)?;
    for d in [data_dir.join("engines"), dir.clone()] {
        flotilla_security::private_dir::ensure(&d).map_err(|e| e.to_string())?;
    }
    let made = flotilla_security::certs::self_signed(host, CERT_DAYS)
        .map_err(|e| format!("cannot make the engine's TLS certificate for {host}: {e}"))?;
    let cert = EngineCert {
        cert: dir.join("tls-cert.pem"),
        key: dir.join("tls-key.pem"),
        pin: CertFingerprint::of_der(&made.cert_der),
    };
    write_atomic(&cert.key, made.key_pem.as_bytes()).map_err(|e| e.to_string())?;
    write_atomic(&cert.cert, made.cert_pem.as_bytes()).map_err(|e| e.to_string())?;
    Ok(cert)
}

/// The certificate of an engine about to run: an adopted engine keeps what it was started
/// with (the pin in its state record; none: it serves plain HTTP, whatever `enabled` says
/// now), a new one gets a new certificate for `host` when `enabled`.
pub async fn prepare(
    data_dir: &Path,
    replica: &str,
    host: &str,
    enabled: bool,
    adopted: Option<&crate::state::SavedEngine>,
) -> Result<Option<EngineCert>, String> {
    if let Some(saved) = adopted {
        let Some(pin) = saved.engine_cert_sha256.as_deref() else { return Ok(None) };
        let pin = pin.parse().map_err(|e| format!("the state file's certificate pin of {replica}: {e}"))?;
        return adopted_cert(data_dir, replica, pin).map(Some);
    }
    if !enabled {
        return Ok(None);
    }
    let (data_dir, replica, host) = (data_dir.to_path_buf(), replica.to_string(), host.to_string());
    tokio::task::spawn_blocking(move || create(&data_dir, &replica, &host))
        .await
        .map_err(|e| format!("certificate task failed: {e}"))?
        .map(Some)
}

/// Removes `replica`'s engine directory (its engine stopped for good); a missing one is fine.
pub fn remove(data_dir: &Path, replica: &str) {
    let Ok(dir) = engine_dir(data_dir, replica) else { return };
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the engine's TLS files"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject as _;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn auto_is_on_off_loopback() {
        for (mode, address, want) in [
            (EngineTlsMode::Auto, "10.0.0.5", true),
            (EngineTlsMode::Auto, "fd00::5", true),
            (EngineTlsMode::Auto, "127.0.0.1", false),
            (EngineTlsMode::Auto, "127.1.2.3", false),
            (EngineTlsMode::Auto, "::1", false),
            (EngineTlsMode::Auto, "localhost", false),
            (EngineTlsMode::On, "127.0.0.1", true),
            (EngineTlsMode::Off, "10.0.0.5", false),
        ] {
            assert_eq!(mode.enabled(address), want, "{mode:?} {address}");
        }
    }

    #[test]
    fn certificates_are_private_pinned_and_removed() {
        let data = tempfile::tempdir().unwrap();
        let c = create(data.path(), "demo-0", "10.0.0.5").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(c.cert, data.path().join("engines/demo-0/tls-cert.pem"));
        assert_eq!((mode(&c.key), mode(&c.cert)), (0o600, 0o600));
        assert_eq!((mode(&data.path().join("engines")), mode(&data.path().join("engines/demo-0"))), (0o700, 0o700));
        let pem = std::fs::read_to_string(&c.cert).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(CertFingerprint::of_der(&der), c.pin, "the pin is the certificate's");
        assert!(std::fs::read_to_string(&c.key).unwrap().contains("PRIVATE KEY"));
        let again = create(data.path(), "demo-0", "10.0.0.5").unwrap();
        assert_ne!(again.pin, c.pin, "a new engine, a new key");
        assert_eq!(adopted_cert(data.path(), "demo-0", c.pin).unwrap(), EngineCert { pin: c.pin, ..again.clone() });
        remove(data.path(), "demo-0");
        assert!(!data.path().join("engines/demo-0").exists());
        remove(data.path(), "demo-0");
        for bad in ["", "..", ".", "a/b", "../x"] {
            assert!(create(data.path(), bad, "10.0.0.5").is_err(), "{bad:?}");
        }
        assert!(create(data.path(), "x", "not a host!").unwrap_err().contains("not a host!"));
    }
}
