//! HTTPS for a public listener (the gateway's `--https-cert`/`--https-key`): a certificate
//! the clients' own trust store accepts (a public CA's, or the company's), not flotilla's
//! CA, and no client certificate asked for: tenants authenticate with their API keys. The
//! files are read again when they change, as for [`crate::Tls`], so a renewed certificate
//! (certbot, cert-manager's files) is picked up without a restart.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::tls::{certs, key, stamp, Stamp, TlsError};

/// How long a client has to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server certificate and key that follow their files.
#[derive(Debug)]
pub struct HttpsCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Stamp<2>, Arc<ServerConfig>)>,
}

fn build(cert: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = key(key_path)?;
    let mut config = ServerConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Invalid(format!("{} and {}: {e}", cert.display(), key_path.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    crate::crypto::prefer_server_order(&mut config);
    Ok(Arc::new(config))
}

impl HttpsCert {
    /// Loads the files; an error names the file that is missing or wrong.
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Arc<HttpsCert>, TlsError> {
        let config = build(&cert, &key)?;
        let s = stamp([cert.as_path(), key.as_path()]);
        Ok(Arc::new(HttpsCert { cert, key, current: Mutex::new((s, config)) }))
    }

    /// The current configuration, rebuilt when the files changed (a half-written renewal
    /// keeps the previous one, with a warning).
    fn config(&self) -> Arc<ServerConfig> {
        let now = stamp([self.cert.as_path(), self.key.as_path()]);
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.0 != now {
            match build(&self.cert, &self.key) {
                Ok(c) => {
                    tracing::info!(cert = %self.cert.display(), "HTTPS certificate changed: new one in use");
                    *cur = (now, c);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "HTTPS certificate files changed but cannot be loaded; keeping the previous ones");
                    cur.0 = now;
                }
            }
        }
        cur.1.clone()
    }

    /// The TLS handshake on an accepted connection, within [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let acceptor = TlsAcceptor::from(self.config());
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no TLS handshake within 10 s")),
        }
    }
}
