//! TLS from files: `--tls-cert`, `--tls-key`, `--tls-ca` (every role; the CLI reads
//! `FLOTILLA_TLS_*`), turned into rustls configurations that follow the files: each
//! handshake asks [`Tls`] for the current configuration, which is rebuilt when a file's
//! modification time or length changed — rotation without a restart. A rotation caught
//! half-written (a key that does not match its certificate) keeps the last good
//! configuration and says so in the log.
//!
//! Both sides verify against the CA file only (no system roots): servers ask clients for a
//! certificate but accept a connection without one (a bearer token may identify it; the
//! role table refuses calls with no identity), clients verify the server's certificate
//! against the name or IP they dialled.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS flags every role takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This process's certificate (PEM), from `flotilla tls cert create`; with --tls-key
    /// and --tls-ca it turns TLS on. Reloaded when the file changes.
    #[arg(long, env = "FLOTILLA_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "FLOTILLA_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) peers' certificates are verified against.
    #[arg(long, env = "FLOTILLA_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
}

/// Why TLS cannot be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("TLS needs --tls-cert, --tls-key and --tls-ca together; {0} is missing")]
    Incomplete(&'static str),
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("{path} holds no {what}")]
    Empty { path: String, what: &'static str },
    #[error("invalid TLS material: {0}")]
    Invalid(String),
}

/// The three files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsArgs {
    /// The files, None when TLS is off (no flag given), an error when only some are given.
    pub fn files(&self) -> Result<Option<TlsFiles>, TlsError> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => {
                Ok(Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() }))
            }
            (None, _, _) => Err(TlsError::Incomplete("--tls-cert")),
            (_, None, _) => Err(TlsError::Incomplete("--tls-key")),
            (_, _, None) => Err(TlsError::Incomplete("--tls-ca")),
        }
    }
}

/// (modification time, length) of each file: what a rotation changes.
pub(crate) type Stamp<const N: usize> = [(Option<SystemTime>, u64); N];

/// The [`Stamp`] of `paths` now (a missing file reads as `(None, 0)`).
pub(crate) fn stamp<const N: usize>(paths: [&Path; N]) -> Stamp<N> {
    paths.map(|p| match std::fs::metadata(p) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    })
}

fn files_stamp(files: &TlsFiles) -> Stamp<3> {
    stamp([&files.cert, &files.key, &files.ca].map(PathBuf::as_path))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read { path: path.display().to_string(), why: e.to_string() })
}

pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Empty { path: path.display().to_string(), what: "PEM certificate" });
    }
    Ok(certs)
}

pub(crate) fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| TlsError::Empty { path: path.display().to_string(), what: "PEM private key" })
}

/// Both configurations, built from one reading of the files.
#[derive(Debug)]
struct Built {
    /// None for a client without a certificate.
    server: Option<Arc<ServerConfig>>,
    client: Arc<ClientConfig>,
    /// The identity of our own certificate, when it names one.
    own: Option<crate::identity::Identity>,
}

/// `client_only`: a client that verifies servers against the CA and shows no certificate
/// (it identifies with a bearer token); the cert and key files are not read.
fn build(files: &TlsFiles, client_only: bool) -> Result<Built, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.ca)? {
        roots.add(ca).map_err(|e| TlsError::Invalid(format!("{}: {e}", files.ca.display())))?;
    }
    let roots = Arc::new(roots);
    let provider = crate::crypto::provider();
    let invalid = |e: rustls::Error| TlsError::Invalid(e.to_string());
    if client_only {
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(invalid)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        return Ok(Built { server: None, client: Arc::new(client), own: None });
    }
    let chain = certs(&files.cert)?;
    let key = key(&files.key)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Invalid(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(invalid)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| TlsError::Invalid(format!("{} and {}: {e}", files.cert.display(), files.key.display())))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    crate::crypto::prefer_server_order(&mut server);
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(invalid)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain.clone(), key)
        .map_err(invalid)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    let own = crate::identity::Identity::from_cert_der(&chain[0]).ok();
    Ok(Built { server: Some(Arc::new(server)), client: Arc::new(client), own })
}

/// TLS configurations that follow their files (see the module docs).
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    /// No certificate of its own (see [`Tls::load_client_only`]).
    client_only: bool,
    current: Mutex<(Stamp<3>, Arc<Built>)>,
}

impl Tls {
    /// Loads the files; an error names the file that is missing or wrong.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        Tls::load_as(files, false)
    }

    /// A client with the CA alone: it verifies servers and shows no certificate (it
    /// identifies with a bearer token). Serving with it fails every handshake.
    pub fn load_client_only(ca: PathBuf) -> Result<Arc<Tls>, TlsError> {
        Tls::load_as(TlsFiles { cert: ca.clone(), key: ca.clone(), ca }, true)
    }

    fn load_as(files: TlsFiles, client_only: bool) -> Result<Arc<Tls>, TlsError> {
        let s = files_stamp(&files);
        let built = build(&files, client_only)?;
        Ok(Arc::new(Tls { files, client_only, current: Mutex::new((s, Arc::new(built))) }))
    }

    /// [`Tls::load`] for flags: None when TLS is off.
    pub fn from_args(args: &TlsArgs) -> Result<Option<Arc<Tls>>, TlsError> {
        args.files()?.map(Tls::load).transpose()
    }

    /// [`Tls::from_args`] for a client, where `--tls-ca` alone is enough
    /// ([`Tls::load_client_only`]).
    pub fn client_from_args(args: &TlsArgs) -> Result<Option<Arc<Tls>>, TlsError> {
        match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
            (None, None, Some(ca)) => Tls::load_client_only(ca.clone()).map(Some),
            _ => Tls::from_args(args),
        }
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn built(&self) -> Arc<Built> {
        let now = files_stamp(&self.files);
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.0 != now {
            match build(&self.files, self.client_only) {
                Ok(b) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS files changed: new certificate in use");
                    *cur = (now, Arc::new(b));
                }
                Err(e) => {
                    // half-written rotation: keep serving with the last good files, retry
                    // on the next handshake after another change
                    tracing::warn!(error = %e, "TLS files changed but cannot be loaded; keeping the previous ones");
                    cur.0 = now;
                }
            }
        }
        cur.1.clone()
    }

    /// The current server configuration (None for a client without a certificate).
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        self.built().server.clone()
    }

    /// The current client configuration.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.built().client.clone()
    }

    /// The identity our own certificate names, if any.
    pub fn own_identity(&self) -> Option<crate::identity::Identity> {
        self.built().own.clone()
    }
}
