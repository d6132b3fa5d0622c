//! Who may call what: one table mapping every gRPC method of every service to the roles
//! allowed to call it (a test fails when a method of the protos is missing from it), and the
//! tower layer that enforces it on a server. With security on, a method not in the table is
//! denied to everyone (default deny), a call without an identity gets UNAUTHENTICATED and a
//! role the method does not allow PERMISSION_DENIED — before the handler runs, so nothing is
//! written. The caller's [`Identity`] goes into the request's extensions for handlers that
//! check more (an agent may only open its own node's session; an operator may not write
//! tenants).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::identity::{Identity, Role};

use Role::{Admin, Agent, Gateway, Operator, Peer, Viewer};

/// Roles that only read.
const READERS: &[Role] = &[Admin, Operator, Viewer, Gateway, Peer];
/// Every role.
const ANYONE: &[Role] = &[Admin, Operator, Viewer, Agent, Gateway, Peer];

/// `(path, roles)` for every method served. Peers (the cluster's servers) may call every
/// method: followers forward writes to the leader under their own identity, after checking
/// the caller's.
pub const TABLE: &[(&str, &[Role])] = &[
    ("/flotilla.v1.ObjectService/Apply", &[Admin, Operator, Peer]),
    ("/flotilla.v1.ObjectService/Get", READERS),
    ("/flotilla.v1.ObjectService/List", READERS),
    ("/flotilla.v1.ObjectService/Delete", &[Admin, Operator, Peer]),
    ("/flotilla.v1.ObjectService/Watch", READERS),
    ("/flotilla.v1.ClusterService/Status", ANYONE),
    ("/flotilla.v1.ClusterService/AddMember", &[Admin, Peer]),
    ("/flotilla.v1.ClusterService/RemoveMember", &[Admin, Peer]),
    ("/flotilla.v1.ClusterService/Audit", &[Admin]),
    // the whole state, secrets included (engine keys, tenant key hashes)
    ("/flotilla.v1.ClusterService/Snapshot", &[Admin]),
    // cluster-wide: not for identities scoped to a label selector
    ("/flotilla.v1.ClusterService/Events", &[Admin, Operator, Viewer, Peer]),
    ("/flotilla.v1.TenantKeyService/CreateKey", &[Admin, Peer]),
    ("/flotilla.v1.TenantKeyService/RevokeKey", &[Admin, Peer]),
    ("/flotilla.v1.RaftService/AppendEntries", &[Peer]),
    ("/flotilla.v1.RaftService/Vote", &[Peer]),
    ("/flotilla.v1.RaftService/InstallSnapshot", &[Peer]),
    ("/flotilla.v1.AgentService/Session", &[Agent]),
    // endpoints carry the engines' keys: gateways (and admins) only
    ("/flotilla.v1.FleetService/WatchEndpoints", &[Admin, Gateway, Peer]),
    ("/flotilla.v1.FleetService/ListNodes", READERS),
    ("/flotilla.v1.FleetService/SetNode", &[Admin, Operator, Peer]),
    ("/flotilla.v1.AdapterService/EnsureLoaded", &[Admin, Operator, Gateway, Peer]),
    ("/flotilla.v1.AdapterService/ReportUsage", &[Gateway, Peer]),
    ("/flotilla.v1.AutoscaleService/ReportDemand", &[Gateway, Peer]),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", &[Admin, Operator, Viewer, Peer]),
];

/// The methods an identity limited by a label selector may call: those on objects, whose
/// labels the object service checks, and reads. Not `SetNode` (nodes are the whole
/// cluster's) nor adapter loads.
pub const SCOPED_METHODS: &[&str] = &[
    "/flotilla.v1.ObjectService/Apply",
    "/flotilla.v1.ObjectService/Get",
    "/flotilla.v1.ObjectService/List",
    "/flotilla.v1.ObjectService/Delete",
    "/flotilla.v1.ObjectService/Watch",
    "/flotilla.v1.ClusterService/Status",
    "/flotilla.v1.FleetService/ListNodes",
];

/// Methods anyone may call, without an identity (load balancers' health checks).
pub const PUBLIC: &[&str] = &["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"];

/// Whether calls are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Security off (`--insecure`, or loopback without TLS): every call allowed.
    Open,
    /// Identities and the table are enforced.
    Enforced,
    /// A server's peer listener (`--peer-addr`): as `Enforced`, and only peers may call.
    PeersOnly,
}

/// The identity a call carries, in its extensions (None: security is off).
#[derive(Debug, Clone)]
pub struct Caller(pub Option<Identity>);

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated(String),
    Denied(String),
}

impl Refusal {
    pub fn status(&self) -> tonic::Status {
        match self {
            Refusal::Unauthenticated(m) => tonic::Status::unauthenticated(m.clone()),
            Refusal::Denied(m) => tonic::Status::permission_denied(m.clone()),
        }
    }
}

/// The roles allowed to call `path`, None when it is not in the table.
pub fn roles_of(path: &str) -> Option<&'static [Role]> {
    TABLE.iter().find(|(p, _)| *p == path).map(|(_, r)| *r)
}

/// The decision for one call (pure).
pub fn decide(mode: Mode, path: &str, identity: Option<&Identity>) -> Result<(), Refusal> {
    if mode == Mode::Open || PUBLIC.contains(&path) {
        return Ok(());
    }
    let Some(roles) = roles_of(path) else {
        return Err(Refusal::Denied(format!("{path} is not in the role table (denied to everyone)")));
    };
    let Some(id) = identity else {
        return Err(Refusal::Unauthenticated(format!(
            "{path} needs an identity: a client certificate with a {}<role>/<name> name, or a valid \
             bearer token (flotilla token create)",
            crate::identity::URI_PREFIX
        )));
    };
    if mode == Mode::PeersOnly && id.role != Role::Peer {
        return Err(Refusal::Denied(format!(
            "{id} may not call {path} here: this is a server's peer listener, for servers only (use its --grpc-addr)"
        )));
    }
    if id.scope.is_some() && !SCOPED_METHODS.contains(&path) {
        return Err(Refusal::Denied(format!(
            "{id} is limited to objects matching {:?} and may not call {path} (scoped operators apply, delete and read objects)",
            id.scope.as_deref().unwrap_or_default()
        )));
    }
    if roles.contains(&id.role) {
        Ok(())
    } else {
        let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(Refusal::Denied(format!("{id} may not call {path} (allowed: {})", allowed.join(", "))))
    }
}

/// Kinds an operator may write (apply, delete); the rest (tenants, and the kinds flotilla
/// manages: nodes, replicas) are an admin's.
pub const OPERATOR_KINDS: &[&str] = &["Model", "Adapter", "FederatedModel", "FederatedAdapter"];

/// Whether `identity` may write objects of `kind` (checked by the object service before a
/// write is forwarded to the leader, so a follower checks the caller, not itself).
pub fn check_kind(identity: Option<&Identity>, kind: &str) -> Result<(), Refusal> {
    match identity {
        Some(id) if id.role == Role::Operator && !OPERATOR_KINDS.iter().any(|k| k.eq_ignore_ascii_case(kind)) => {
            Err(Refusal::Denied(format!(
                "{id} may not write {kind} objects (operators write {}; tenants and the rest need admin)",
                OPERATOR_KINDS.join(" and ")
            )))
        }
        _ => Ok(()),
    }
}

/// The certificates a request's TLS peer presented, its own first.
fn peer_certs<B>(req: &http::Request<B>) -> Option<Arc<Vec<rustls_pki_types::CertificateDer<'static>>>> {
    req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()
}

/// Identities by certificate, so a call on a kept-alive connection does not parse its
/// certificate again (an X.509 parse per call was a visible part of the TLS cost at 64
/// clients). The identity is a pure function of the certificate's bytes, which the handshake
/// has already verified, so a cached answer is the answer; a rotated certificate is other
/// bytes and another entry. Bounded: cleared when full.
#[derive(Debug, Default)]
struct IdentityCache(Mutex<HashMap<Vec<u8>, Option<Identity>>>);

/// Certificates remembered at most (a cluster has a few hundred clients at most; past this
/// the cache starts again empty).
const IDENTITY_CACHE_SIZE: usize = 4096;

impl IdentityCache {
    fn identity(&self, der: &[u8]) -> Option<Identity> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = map.get(der) {
            return found.clone();
        }
        let identity = Identity::from_cert_der(der).ok();
        if map.len() >= IDENTITY_CACHE_SIZE {
            map.clear();
        }
        map.insert(der.to_vec(), identity.clone());
        identity
    }
}

/// Turns a bearer token into an identity (the server's store of tokens): None when the
/// token is unknown, expired or does not match.
pub trait TokenVerifier: Send + Sync + std::fmt::Debug {
    fn verify(&self, token: &str) -> Option<Identity>;
}

/// The bearer token of a request (`authorization: Bearer T`), if any.
pub fn bearer<B>(req: &http::Request<B>) -> Option<&str> {
    let v = req.headers().get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The layer: enforces [`decide`] and puts the [`Caller`] into the request. The identity
/// is the client certificate's; without one, a bearer token's (when a verifier is set).
#[derive(Debug, Clone)]
pub struct AuthorizeLayer {
    mode: Mode,
    tokens: Option<Arc<dyn TokenVerifier>>,
    log: Arc<Mutex<HashMap<(String, String), Instant>>>,
    certs: Arc<IdentityCache>,
}

impl AuthorizeLayer {
    pub fn new(mode: Mode) -> Self {
        AuthorizeLayer { mode, tokens: None, log: Arc::default(), certs: Arc::default() }
    }

    /// Accepts bearer tokens `tokens` verifies.
    pub fn with_tokens(mut self, tokens: Arc<dyn TokenVerifier>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    fn identity<B>(&self, req: &http::Request<B>) -> Option<Identity> {
        peer_certs(req)
            .and_then(|certs| self.certs.identity(certs.first()?))
            .or_else(|| self.tokens.as_ref().and_then(|t| t.verify(bearer(req)?)))
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner, layer: self.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

impl AuthorizeLayer {
    /// Logs a refusal, at most once a minute per (who, method).
    fn log_refusal(&self, who: &str, path: &str, r: &Refusal) {
        let now = Instant::now();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let key = (who.to_string(), path.to_string());
        if log.get(&key).is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60)) {
            return;
        }
        if log.len() > 4096 {
            log.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        }
        log.insert(key, now);
        tracing::warn!(who, method = path, refusal = ?r, "call refused");
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let identity = match self.layer.mode {
            Mode::Open => None,
            Mode::Enforced | Mode::PeersOnly => self.layer.identity(&req),
        };
        let path = req.uri().path().to_string();
        match decide(self.layer.mode, &path, identity.as_ref()) {
            Ok(()) => {
                req.extensions_mut().insert(Caller(identity));
                Box::pin(self.inner.call(req))
            }
            Err(r) => {
                let who = identity.map_or_else(|| "anonymous".to_string(), |i| i.to_string());
                self.layer.log_refusal(&who, &path, &r);
                let response = r.status().into_http::<R>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `rpc` of every proto file is in the table: a method added without a row would
    /// be denied to everyone, and this says so at build time instead.
    #[test]
    fn every_method_of_the_protos_is_in_the_table() {
        let protos = [
            include_str!("../../api/proto/flotilla/v1/object.proto"),
            include_str!("../../api/proto/flotilla/v1/cluster.proto"),
            include_str!("../../api/proto/flotilla/v1/raft.proto"),
            include_str!("../../api/proto/flotilla/v1/agent.proto"),
            include_str!("../../api/proto/flotilla/v1/fleet.proto"),
            include_str!("../../api/proto/flotilla/v1/adapter.proto"),
            include_str!("../../api/proto/flotilla/v1/autoscale.proto"),
        ];
        let mut found = 0;
        for proto in protos {
            let mut service = "";
            for line in proto.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("service ") {
                    service = rest.split_whitespace().next().unwrap_or_default();
                }
                if let Some(rest) = line.strip_prefix("rpc ") {
                    let method = rest.split('(').next().unwrap_or_default().trim();
                    let path = format!("/flotilla.v1.{service}/{method}");
                    assert!(roles_of(&path).is_some(), "{path} is missing from the role table");
                    found += 1;
                }
            }
        }
        assert_eq!(found + 1, TABLE.len(), "the table has rows for methods the protos do not have");
    }

    #[test]
    fn the_identity_cache_answers_what_the_certificate_says_and_stays_bounded() {
        use crate::certs::{self, CertRequest};
        use rustls_pki_types::pem::PemObject;
        let ca = certs::create_ca("test CA", 1).unwrap();
        let der = |identity: Option<Identity>| {
            let leaf = certs::issue(&ca, &CertRequest { identity, dns: vec![], ips: vec![], days: 1 }).unwrap();
            rustls_pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap().to_vec()
        };
        let alice = Identity::new(Admin, "alice").unwrap();
        let (a, anon) = (der(Some(alice.clone())), der(None));
        let cache = IdentityCache::default();
        for _ in 0..2 {
            assert_eq!(cache.identity(&a), Some(alice.clone()));
            assert_eq!(cache.identity(&anon), None, "a certificate naming no identity names none, cached or not");
        }
        let other = der(Some(Identity::new(Viewer, "vic").unwrap()));
        assert_eq!(cache.identity(&other).map(|i| i.role), Some(Viewer), "another certificate, another answer");
        for i in 0..IDENTITY_CACHE_SIZE + 1 {
            let mut junk = a.clone();
            junk.extend_from_slice(&i.to_le_bytes());
            cache.identity(&junk);
        }
        assert!(cache.0.lock().unwrap().len() <= IDENTITY_CACHE_SIZE);
        assert_eq!(cache.identity(&a), Some(alice));
    }

    #[test]
    fn the_peer_listener_serves_peers_only() {
        let peer = Identity::new(Peer, "s2").unwrap();
        let admin = Identity::new(Admin, "root").unwrap();
        let append = "/flotilla.v1.RaftService/AppendEntries";
        let apply = "/flotilla.v1.ObjectService/Apply";
        assert_eq!(decide(Mode::PeersOnly, append, Some(&peer)), Ok(()));
        assert_eq!(decide(Mode::PeersOnly, apply, Some(&peer)), Ok(()), "forwarded writes");
        let e = decide(Mode::PeersOnly, apply, Some(&admin)).unwrap_err();
        assert!(matches!(&e, Refusal::Denied(m) if m.contains("peer listener")), "{e:?}");
        assert!(matches!(decide(Mode::PeersOnly, append, None), Err(Refusal::Unauthenticated(_))));
        assert_eq!(decide(Mode::PeersOnly, "/grpc.health.v1.Health/Check", None), Ok(()));
    }

    #[test]
    fn operators_write_models_and_adapters_only() {
        let op = Identity::new(Operator, "ops").unwrap();
        let admin = Identity::new(Admin, "root").unwrap();
        for (who, kind, ok) in [
            (Some(&op), "Model", true),
            (Some(&op), "adapter", true),
            (Some(&op), "Tenant", false),
            (Some(&op), "Node", false),
            (Some(&admin), "Tenant", true),
            (None, "Tenant", true),
        ] {
            assert_eq!(check_kind(who, kind).is_ok(), ok, "{who:?} {kind}");
        }
    }

    #[test]
    fn decisions_follow_the_table() {
        let id = |role, name: &str| Identity::new(role, name).unwrap();
        let apply = "/flotilla.v1.ObjectService/Apply";
        assert_eq!(decide(Mode::Open, apply, None), Ok(()));
        assert!(matches!(decide(Mode::Enforced, apply, None), Err(Refusal::Unauthenticated(_))));
        assert_eq!(decide(Mode::Enforced, apply, Some(&id(Operator, "ops"))), Ok(()));
        let denied = decide(Mode::Enforced, apply, Some(&id(Viewer, "v")));
        assert!(matches!(&denied, Err(Refusal::Denied(m)) if m.contains("viewer/v may not call")), "{denied:?}");
        assert!(matches!(decide(Mode::Enforced, "/x.Y/Z", Some(&id(Admin, "a"))), Err(Refusal::Denied(_))));
        assert_eq!(decide(Mode::Enforced, PUBLIC[0], None), Ok(()));
        for m in ["AppendEntries", "Vote", "InstallSnapshot"] {
            let p = format!("/flotilla.v1.RaftService/{m}");
            for role in Role::ALL {
                assert_eq!(decide(Mode::Enforced, &p, Some(&id(role, "x"))).is_ok(), role == Peer, "{role} {p}");
            }
        }
        assert_eq!(
            decide(Mode::Enforced, "/flotilla.v1.AgentService/Session", Some(&id(Gateway, "g")))
                .map_err(|r| r.status().code()),
            Err(tonic::Code::PermissionDenied)
        );
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[derive(Debug)]
    struct One;
    impl TokenVerifier for One {
        fn verify(&self, token: &str) -> Option<Identity> {
            (token == "good").then(|| Identity::new(Role::Viewer, "ci").unwrap())
        }
    }

    #[test]
    fn a_bearer_token_identifies_a_caller_without_a_certificate() {
        let layer = AuthorizeLayer::new(Mode::Enforced).with_tokens(Arc::new(One));
        let req = |auth: Option<&str>| {
            let mut b = http::Request::builder().uri("/flotilla.v1.ObjectService/Get");
            if let Some(a) = auth {
                b = b.header("authorization", a);
            }
            b.body(()).unwrap()
        };
        assert_eq!(layer.identity(&req(Some("Bearer good"))).map(|i| i.to_string()), Some("viewer/ci".into()));
        assert_eq!(layer.identity(&req(Some("bearer good"))).map(|i| i.role), Some(Role::Viewer));
        assert_eq!(layer.identity(&req(Some("Bearer bad"))), None);
        assert_eq!(layer.identity(&req(Some("Basic good"))), None);
        assert_eq!(layer.identity(&req(None)), None);
        assert_eq!(AuthorizeLayer::new(Mode::Enforced).identity(&req(Some("Bearer good"))), None, "no verifier");
    }
}
