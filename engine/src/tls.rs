//! TLS to engines, pinned: a rustls [`ServerCertVerifier`] that accepts an engine's
//! certificate only when its SHA-256 is in the [`EnginePins`] for the host dialled (the
//! usual hostname and CA checks are replaced by the pin; the handshake's signatures are
//! verified with the ring provider's algorithms as usual), and the connector clients use:
//! hyper-rustls `https_or_http`, so `http://` engines keep working and `https://` ones are
//! pinned.
//!
//! A certificate that does not match fails the handshake: no request, no prompt and no key
//! is sent to it. Each such host is logged at warn at most once a minute
//! ([`MISMATCH_LOG_EVERY`]); [`pin_mismatch`] finds the reason in a client error's chain.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use tokio::time::Instant;

use crate::pins::{pin_host, CertFingerprint, EnginePins};

/// The connector of engine clients: plain http, or https verified by pins.
pub type PinnedConnector = HttpsConnector<HttpConnector>;

/// How often a host whose certificate does not match its pin is logged, at most.
pub const MISMATCH_LOG_EVERY: Duration = Duration::from_secs(60);

/// Why an engine's certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("engine certificate of {host} (sha256 {got}) is not the one pinned for it ({pinned}); no request sent")]
pub struct PinMismatch {
    /// The host dialled.
    pub host: String,
    /// The fingerprint of the certificate it showed.
    pub got: String,
    /// The fingerprints pinned for it, or `none pinned`.
    pub pinned: String,
}

/// The verifier: pins instead of a CA and a name.
struct PinVerifier {
    pins: EnginePins,
    algorithms: WebPkiSupportedAlgorithms,
    /// When each refused host was last logged.
    logged: Mutex<HashMap<String, Instant>>,
}

impl fmt::Debug for PinVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinVerifier").field("pins", &self.pins).finish()
    }
}

fn host_of(name: &ServerName<'_>) -> Option<String> {
    match name {
        ServerName::DnsName(d) => pin_host(d.as_ref()),
        ServerName::IpAddress(ip) => Some(std::net::IpAddr::from(*ip).to_string()),
        _ => None,
    }
}

impl PinVerifier {
    /// Logs `m` unless its host was logged within [`MISMATCH_LOG_EVERY`]; whether it did.
    fn log_once(&self, m: &PinMismatch) -> bool {
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.get(&m.host).is_some_and(|t| now.saturating_duration_since(*t) < MISMATCH_LOG_EVERY) {
            return false;
        }
        logged.retain(|_, t| now.saturating_duration_since(*t) < MISMATCH_LOG_EVERY);
        logged.insert(m.host.clone(), now);
        tracing::warn!(host = %m.host, got = %m.got, pinned = %m.pinned, "engine certificate does not match its pin; no request sent to it");
        true
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = CertFingerprint::of_der(end_entity.as_ref());
        let host = host_of(server_name).unwrap_or_default();
        if self.pins.allows(&host, &got) {
            return Ok(ServerCertVerified::assertion());
        }
        let pinned = self.pins.pinned(&host);
        let m = PinMismatch {
            host,
            got: got.hex(),
            pinned: if pinned.is_empty() {
                "none pinned".to_string()
            } else {
                pinned.iter().map(CertFingerprint::hex).collect::<Vec<_>>().join(", ")
            },
        };
        self.log_once(&m);
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(m)))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A rustls client configuration that trusts exactly the certificates `pins` holds (ring,
/// TLS 1.2 and 1.3; [`connector`] adds ALPN `http/1.1`). Session resumption is off: a resumed
/// handshake skips the certificate check, and every new connection must show a certificate
/// pinned now (connections are pooled, so full handshakes stay rare).
pub fn client_config(pins: &EnginePins) -> rustls::ClientConfig {
    let provider = flotilla_security::crypto::provider();
    let verifier = Arc::new(PinVerifier {
        pins: pins.clone(),
        algorithms: provider.signature_verification_algorithms,
        logged: Mutex::default(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config
}

/// `http` wrapped so that `https://` URIs are dialled with TLS pinned by `pins` and
/// `http://` ones stay plain.
pub fn connector(mut http: HttpConnector, pins: &EnginePins) -> PinnedConnector {
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(pins))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// The [`PinMismatch`] somewhere in `e`'s chain (hyper's errors wrap the connector's, which
/// wrap rustls's in `io::Error`s), if that is why it failed.
pub fn pin_mismatch(e: &(dyn std::error::Error + 'static)) -> Option<PinMismatch> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(m) = as_mismatch(err) {
            return Some(m);
        }
        // io::Error's source() skips the error it wraps: look inside.
        if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(m) = pin_mismatch(inner) {
                return Some(m);
            }
        }
        cur = err.source();
    }
    None
}

fn as_mismatch(e: &(dyn std::error::Error + 'static)) -> Option<PinMismatch> {
    match e.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            let inner: &(dyn std::error::Error + 'static) = &**inner;
            inner.downcast_ref::<PinMismatch>().cloned()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_is_found_inside_io_errors() {
        let m = PinMismatch { host: "10.0.0.1".into(), got: "aa".into(), pinned: "none pinned".into() };
        let tls = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(m.clone()))));
        let io = std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, tls));
        assert_eq!(pin_mismatch(&io), Some(m.clone()));
        assert!(m.to_string().ends_with("is not the one pinned for it (none pinned); no request sent"), "{m}");
        let other = std::io::Error::other(rustls::Error::InvalidCertificate(CertificateError::Expired));
        assert_eq!(pin_mismatch(&other), None);
        assert_eq!(pin_mismatch(&std::io::Error::other("refused")), None);
    }

    #[tokio::test(start_paused = true)]
    async fn mismatches_are_logged_once_a_minute_per_host() {
        let provider = rustls::crypto::ring::default_provider();
        let v = PinVerifier {
            pins: EnginePins::new(),
            algorithms: provider.signature_verification_algorithms,
            logged: Mutex::default(),
        };
        let m = |host: &str| PinMismatch { host: host.into(), got: "aa".into(), pinned: "bb".into() };
        assert!(v.log_once(&m("10.0.0.1")));
        assert!(!v.log_once(&m("10.0.0.1")), "the same host within the minute");
        assert!(v.log_once(&m("10.0.0.2")), "another host");
        tokio::time::advance(MISMATCH_LOG_EVERY - Duration::from_millis(1)).await;
        assert!(!v.log_once(&m("10.0.0.1")));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(v.log_once(&m("10.0.0.1")), "a minute later");
        assert_eq!(v.logged.lock().unwrap().len(), 1, "expired hosts are forgotten");
    }

    #[test]
    fn verifier_names_are_pin_hosts() {
        let ip = ServerName::try_from("10.0.0.1").unwrap();
        assert_eq!(host_of(&ip).as_deref(), Some("10.0.0.1"));
        let v6 = ServerName::try_from("::1").unwrap();
        assert_eq!(host_of(&v6).as_deref(), Some("::1"));
        let dns = ServerName::try_from("Engine.Example").unwrap();
        assert_eq!(host_of(&dns).as_deref(), Some("engine.example"));
    }
}
