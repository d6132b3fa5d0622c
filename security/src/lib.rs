//! Transport security and identity for every role (see docs/security.md):
//!
//! ```text
//! certs     flotilla tls ca create / cert create: a CA, leaf certificates naming an identity
//! identity  Role + name, carried as the URI SAN spiffe://flotilla/<role>/<name>
//! crypto    the rustls provider (ring, AES-128-GCM first) every link uses
//! tls       --tls-cert/--tls-key/--tls-ca -> rustls configs that follow the files (rotation)
//! incoming  server side: TCP -> TLS before tonic (concurrent, bounded handshakes)
//! connect   client side: tonic channels through a TLS connector (name of the configured address)
//! authz     the role table of every gRPC method, and the layer that enforces it
//! private_dir  data dirs 0700 and files 0600 (server and agent)
//! ```
#![forbid(unsafe_code)]

pub mod authz;
pub mod certs;
pub mod connect;
pub mod crypto;
pub mod https;
pub mod identity;
pub mod incoming;
pub mod private_dir;
pub mod tls;

pub use authz::{AuthorizeLayer, Caller, Mode, TokenVerifier};
pub use identity::{Identity, Role};
pub use tls::{Tls, TlsArgs, TlsError, TlsFiles};
