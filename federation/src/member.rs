//! A member cluster's gRPC API as the federation's controller uses it: list objects, apply
//! and delete member objects with compare-and-set. Each call tries the Cluster's servers in
//! order (a follower forwards writes to its leader) and is bounded by [`CALL_TIMEOUT`], so
//! a dead or partitioned cluster costs one timeout per tick, never a stuck controller.
//!
//! Identity: the bearer token in the Cluster's `token_file` (an operator token of the member
//! cluster; read at each connection, so a rotated file is picked up), TLS verified against
//! the Cluster's `ca_file`, else the federation server's own CA when it runs TLS, else plain
//! HTTP. The federation never presents its own server certificate to a member: it is a
//! client with the member's token, not a peer of the member's Raft group.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ApplyRequest, DeleteRequest, ListRequest, Object};
use flotilla_api::spec::ClusterSpec;
use tonic::transport::Endpoint;
use tonic::Code;

/// How long one call to one member server may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting to one member server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a member call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No server of the cluster answered (down, partitioned, no leader).
    Unreachable(String),
    /// A compare-and-set lost: the object changed since it was read.
    Conflict(String),
    /// The member refused the call (a bad token, a refused spec): it will refuse it again.
    Refused(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(m) => write!(f, "unreachable: {m}"),
            CallError::Conflict(m) => write!(f, "changed meanwhile: {m}"),
            CallError::Refused(m) => write!(f, "refused: {m}"),
        }
    }
}

/// One member cluster's API.
pub struct Member {
    servers: Vec<String>,
    token_file: Option<PathBuf>,
    tls: Option<Arc<flotilla_security::Tls>>,
}

impl Member {
    /// The client for `spec`; `own_ca` is the federation server's own CA file, when it runs
    /// TLS. An error names the CA file that cannot be loaded.
    pub fn new(spec: &ClusterSpec, own_ca: Option<&std::path::Path>) -> Result<Member, String> {
        let ca = spec.ca_file.as_ref().map(PathBuf::from).or_else(|| own_ca.map(PathBuf::from));
        let tls = ca
            .map(|ca| {
                flotilla_security::Tls::load_client_only(ca.clone()).map_err(|e| format!("{}: {e}", ca.display()))
            })
            .transpose()?;
        Ok(Member { servers: spec.servers.clone(), token_file: spec.token_file.as_ref().map(PathBuf::from), tls })
    }

    fn token(&self) -> Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>, CallError> {
        let Some(path) = &self.token_file else { return Ok(None) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| CallError::Refused(format!("token file {}: {e}", path.display())))?;
        format!("Bearer {}", text.trim())
            .parse()
            .map(Some)
            .map_err(|_| CallError::Refused(format!("token file {}: not printable ASCII", path.display())))
    }

    async fn client(&self, addr: &str) -> Result<ObjectServiceClient<tonic::transport::Channel>, String> {
        // TLS runs below tonic (flotilla_security::connect): the URI stays http://
        let plain = addr.strip_prefix("https://").or_else(|| addr.strip_prefix("http://")).unwrap_or(addr);
        let endpoint = Endpoint::from_shared(format!("http://{}", flotilla_api::dial::dial_address(plain)))
            .map_err(|e| format!("bad address {addr:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let channel = tokio::time::timeout(
            CONNECT_TIMEOUT,
            flotilla_security::connect::connect(endpoint, self.tls.as_ref(), addr),
        )
        .await
        .map_err(|_| format!("{addr}: connect timed out"))?
        .map_err(|e| format!("{addr}: {e}"))?;
        Ok(ObjectServiceClient::new(channel))
    }

    /// Runs `call` against each server in turn until one answers with something other than
    /// "unavailable".
    async fn each<T, F, Fut>(&self, mut call: F) -> Result<T, CallError>
    where
        F: FnMut(ObjectServiceClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut last = String::from("no servers");
        for addr in &self.servers {
            let client = match self.client(addr).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match tokio::time::timeout(CALL_TIMEOUT, call(client)).await {
                Err(_) => last = format!("{addr}: no answer within {CALL_TIMEOUT:?}"),
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s)) => match s.code() {
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                        last = format!("{addr}: {}", s.message())
                    }
                    Code::FailedPrecondition if is_conflict(&s) => {
                        return Err(CallError::Conflict(s.message().to_string()))
                    }
                    _ => return Err(CallError::Refused(format!("{addr}: {:?}: {}", s.code(), s.message()))),
                },
            }
        }
        Err(CallError::Unreachable(last))
    }

    /// Objects of `kind` (linearizable read).
    pub async fn list(&self, kind: &str) -> Result<Vec<Object>, CallError> {
        let token = self.token()?;
        self.each(|mut c| {
            let mut req =
                tonic::Request::new(ListRequest { kind: kind.into(), label_selector: String::new(), stale: false });
            if let Some(t) = &token {
                req.metadata_mut().insert("authorization", t.clone());
            }
            async move { c.list(req).await.map(|r| r.into_inner().objects) }
        })
        .await
    }

    /// Applies `manifest` if the object's revision is still `expected` (0: absent).
    pub async fn apply(&self, manifest: &str, expected: u64) -> Result<(), CallError> {
        let token = self.token()?;
        self.each(|mut c| {
            let mut req =
                tonic::Request::new(ApplyRequest { manifest: manifest.to_string(), expected_revision: Some(expected) });
            if let Some(t) = &token {
                req.metadata_mut().insert("authorization", t.clone());
            }
            async move { c.apply(req).await.map(|_| ()) }
        })
        .await
    }

    /// Deletes object `kind`/`name` if its revision is still `expected`.
    pub async fn delete(&self, kind: &str, name: &str, expected: u64) -> Result<(), CallError> {
        let token = self.token()?;
        self.each(|mut c| {
            let mut req = tonic::Request::new(DeleteRequest {
                kind: kind.into(),
                name: name.into(),
                expected_revision: Some(expected),
            });
            if let Some(t) = &token {
                req.metadata_mut().insert("authorization", t.clone());
            }
            async move {
                match c.delete(req).await {
                    Err(s) if s.code() == Code::NotFound => Ok(()),
                    other => other.map(|_| ()),
                }
            }
        })
        .await
    }
}

/// Whether `s` is a lost compare-and-set (`cluster.conflict`).
fn is_conflict(s: &tonic::Status) -> bool {
    s.message().starts_with("cluster.conflict")
}
