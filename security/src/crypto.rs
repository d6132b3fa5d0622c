//! The one rustls crypto provider every flotilla TLS link uses: ring (no cmake, AES-NI and
//! CLMUL where the CPU has them) with the TLS 1.3 cipher suites reordered so AES-128-GCM
//! comes first. The rest of the defaults stay. Why the order: our records are small (a
//! gRPC message, an SSE chunk), so each costs about its AEAD set-up; AES-128 runs 10 rounds
//! where AES-256 runs 14, with the same security margin for what these links carry
//! (TLS 1.3 allows either). Servers honour their own order
//! ([`prefer_server_order`]), so OpenSSL clients, which ask for AES-256 first, get AES-128
//! too. ChaCha20-Poly1305 stays in the list for CPUs without AES instructions.
use std::sync::Arc;

use rustls::crypto::{ring, CryptoProvider};
use rustls::SupportedCipherSuite;

/// The cipher suites in our order: AES-128-GCM, AES-256-GCM, ChaCha20 for TLS 1.3, then
/// ring's TLS 1.2 suites as they are.
fn cipher_suites() -> Vec<SupportedCipherSuite> {
    let mut suites = ring::default_provider().cipher_suites;
    let rank = |s: &SupportedCipherSuite| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        _ => 3,
    };
    suites.sort_by_key(rank); // stable: the TLS 1.2 suites keep ring's order
    suites
}

/// The provider for every client and server configuration flotilla builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider { cipher_suites: cipher_suites(), ..ring::default_provider() })
}

/// A server picks from its own list (AES-128-GCM first) rather than the client's.
pub fn prefer_server_order(config: &mut rustls::ServerConfig) {
    config.ignore_client_order = true;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_comes_first_and_nothing_is_dropped() {
        let ours = provider().cipher_suites.clone();
        assert_eq!(ours[0].suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(ours[1].suite(), rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
        let mut a: Vec<_> = ours.iter().map(|s| format!("{:?}", s.suite())).collect();
        let mut b: Vec<_> = ring::default_provider().cipher_suites.iter().map(|s| format!("{:?}", s.suite())).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }
}
