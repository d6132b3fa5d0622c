//! The routing table's endpoints: ready engines ([`Endpoint`], named by [`EndpointId`]) with
//! their loaded LoRA adapters, the engine's own load figures, its API key and, for an engine
//! serving TLS, its certificate pin, grouped by model in an [`EndpointSet`] that resolves a
//! requested model or adapter name to its candidates.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use flotilla_api::pb;
use flotilla_engine::{CertFingerprint, EngineKey, EngineMetrics};
use http::uri::Authority;

use crate::names::{AdapterName, ModelName, ServedName};

/// An engine endpoint, named by its `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(Arc<str>);

impl EndpointId {
    pub fn new(s: &str) -> Self {
        EndpointId(Arc::from(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Load figures reported by the engine (through the agent or a scrape).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    pub running: f64,
    pub waiting: f64,
    pub kv_cache_usage: f64,
}

impl From<&EngineMetrics> for EngineLoad {
    /// The routing signals of a standardized scrape (see `flotilla_engine::metrics`).
    fn from(m: &EngineMetrics) -> Self {
        EngineLoad { running: m.running, waiting: m.waiting, kv_cache_usage: m.kv_cache_usage }
    }
}

/// One ready engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub id: EndpointId,
    pub model: ModelName,
    pub authority: Authority,
    pub node: String,
    /// The replica's name (empty for static backends): `EnsureLoaded`'s avoid list.
    pub replica: String,
    pub adapters: Vec<AdapterName>,
    pub engine: EngineLoad,
    /// The engine's API key, sent as a bearer token on every request to it (None: static
    /// backends and engines started without one).
    pub api_key: Option<EngineKey>,
    /// The replica's template hash as a number (0: unknown, static backends): the side of
    /// a canary it is on ([`crate::canary`]).
    pub revision: u64,
    /// The SHA-256 of the certificate the engine serves TLS with: requests go to `https://`
    /// and only that certificate is accepted. None: plain HTTP.
    pub cert: Option<CertFingerprint>,
}

impl Endpoint {
    pub fn new(model: impl Into<ModelName>, authority: Authority) -> Self {
        Endpoint {
            id: EndpointId::new(authority.as_str()),
            model: model.into(),
            authority,
            node: String::new(),
            replica: String::new(),
            adapters: Vec::new(),
            engine: EngineLoad::default(),
            api_key: None,
            revision: 0,
            cert: None,
        }
    }

    /// The URL of `path` on this engine: `http://host:port/path`, or for an engine serving
    /// TLS `https://PIN@host:port/path`. The pin rides in the userinfo because hyper's
    /// connection pool keys connections by scheme and authority (userinfo included): a
    /// connection verified under one pin is never reused for an endpoint now pinned to
    /// another, which gets a new handshake. It never leaves the gateway: requests go out in
    /// origin form, and the Host header is the host and port only.
    pub fn url(&self, path: &str) -> String {
        match &self.cert {
            Some(pin) => format!("https://{pin}@{}{path}", self.authority),
            None => format!("http://{}{path}", self.authority),
        }
    }
}

/// Ready endpoints grouped by model.
#[derive(Debug, Default)]
pub struct EndpointSet {
    pub by_model: HashMap<ModelName, Vec<Arc<Endpoint>>>,
}

/// The endpoints a request for a model name may go to.
#[derive(Debug)]
pub struct Resolved {
    /// The base model (whose routing strategy applies).
    pub base_model: ModelName,
    /// Set when the name is a LoRA adapter.
    pub adapter: Option<AdapterName>,
    pub endpoints: Vec<Arc<Endpoint>>,
}

impl EndpointSet {
    pub fn from_endpoints(eps: impl IntoIterator<Item = Endpoint>) -> Self {
        let mut by_model: HashMap<ModelName, Vec<Arc<Endpoint>>> = HashMap::new();
        for e in eps {
            by_model.entry(e.model.clone()).or_default().push(Arc::new(e));
        }
        for v in by_model.values_mut() {
            v.sort_by(|a, b| a.id.cmp(&b.id));
            v.dedup_by(|a, b| a.id == b.id);
        }
        EndpointSet { by_model }
    }

    /// Resolves a model or adapter name; LoRA awareness: an adapter name yields only the
    /// endpoints that have it loaded.
    pub fn resolve(&self, name: &str) -> Option<Resolved> {
        if let Some((model, eps)) = self.by_model.get_key_value(name) {
            return Some(Resolved { base_model: model.clone(), adapter: None, endpoints: eps.clone() });
        }
        let mut found: Option<(ModelName, AdapterName)> = None;
        let mut endpoints = Vec::new();
        for (model, eps) in &self.by_model {
            for e in eps {
                if let Some(a) = e.adapters.iter().find(|a| *a == name) {
                    found.get_or_insert_with(|| (model.clone(), a.clone()));
                    endpoints.push(e.clone());
                }
            }
        }
        found.map(|(base_model, adapter)| Resolved { base_model, adapter: Some(adapter), endpoints })
    }

    /// `(id, owned_by)` for `/v1/models`: models, then adapters with their base model.
    pub fn listing(&self) -> Vec<(ServedName, Option<ModelName>)> {
        let mut out: Vec<(ServedName, Option<ModelName>)> =
            self.by_model.keys().map(|m| (ServedName::from(m), None)).collect();
        let mut adapters: Vec<(ServedName, Option<ModelName>)> = Vec::new();
        for (model, eps) in &self.by_model {
            for e in eps {
                for a in &e.adapters {
                    if !adapters.iter().any(|(n, _)| n == a.as_str()) && !self.by_model.contains_key(a.as_str()) {
                        adapters.push((ServedName::from(a), Some(model.clone())));
                    }
                }
            }
        }
        out.sort();
        adapters.sort();
        out.extend(adapters);
        out
    }

    pub fn len(&self) -> usize {
        self.by_model.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(address, pin)` of every endpoint serving TLS (for `flotilla_engine::EnginePins`).
    pub fn pins(&self) -> impl Iterator<Item = (&str, CertFingerprint)> {
        self.by_model.values().flatten().filter_map(|e| Some((e.authority.as_str(), e.cert?)))
    }
}

/// Converts one endpoint of the control plane's shape (None when its address, its key or its
/// certificate pin is unusable: a key a header cannot carry would only earn 401s, and an
/// engine whose pin cannot be read cannot be trusted).
pub fn endpoint_of(e: &pb::Endpoint) -> Option<Endpoint> {
    let authority = e.address.trim_start_matches("http://").trim_end_matches('/').parse().ok()?;
    let api_key = match e.api_key.as_str() {
        "" => None,
        k => Some(EngineKey::new(k)?),
    };
    let cert = match e.engine_cert_sha256.as_str() {
        "" => None,
        pin => Some(pin.parse().ok()?),
    };
    let mut ep = Endpoint::new(e.model.as_str(), authority);
    ep.api_key = api_key;
    ep.revision = crate::canary::revision_of(&e.template_hash);
    ep.cert = cert;
    ep.node = e.node.clone();
    ep.replica = e.replica.clone();
    ep.adapters = e.loaded_adapters.iter().map(|a| AdapterName::new(a)).collect();
    ep.engine = EngineLoad {
        running: e.num_requests_running,
        waiting: e.num_requests_waiting,
        kv_cache_usage: e.kv_cache_usage,
    };
    Some(ep)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An endpoint of `model` at `addr` holding `adapters` (for tests).
    pub(crate) fn ep(model: &str, addr: &str, adapters: &[&str]) -> Endpoint {
        let mut e = Endpoint::new(model, addr.parse().unwrap());
        e.adapters = adapters.iter().map(|s| AdapterName::new(s)).collect();
        e
    }

    #[test]
    fn the_control_planes_endpoints_carry_their_keys() {
        let wire = |address: &str, api_key: &str| pb::Endpoint {
            replica: "m-1".into(),
            model: "m".into(),
            address: address.into(),
            api_key: api_key.into(),
            ..pb::Endpoint::default()
        };
        let keyed = endpoint_of(&wire("10.0.0.1:20000", "k3y")).unwrap();
        assert_eq!(keyed.api_key.as_ref().map(EngineKey::expose), Some("k3y"));
        assert!(!format!("{keyed:?}").contains("k3y"), "Debug hides the key");
        assert_eq!(endpoint_of(&wire("10.0.0.1:20000", "")).unwrap().api_key, None);
        assert!(endpoint_of(&wire("10.0.0.1:20000", "bad key")).is_none());
        assert!(endpoint_of(&wire("not an address", "k3y")).is_none());
    }

    #[test]
    fn engines_serving_tls_carry_their_pin_and_are_called_over_https() {
        let pin = "ab".repeat(32);
        let wire = |cert: &str| pb::Endpoint {
            model: "m".into(),
            address: "10.0.0.1:20000".into(),
            engine_cert_sha256: cert.into(),
            ..pb::Endpoint::default()
        };
        let tls = endpoint_of(&wire(&pin)).unwrap();
        assert_eq!(tls.cert.map(|c| c.hex()), Some(pin.clone()));
        let url: http::Uri = tls.url("/v1/completions").parse().unwrap();
        assert_eq!(url.to_string(), format!("https://{pin}@10.0.0.1:20000/v1/completions"));
        assert_eq!((url.host(), url.port_u16()), (Some("10.0.0.1"), Some(20000)), "dialled as host:port");
        let plain = endpoint_of(&wire("")).unwrap();
        assert_eq!((plain.cert, plain.url("/x").as_str()), (None, "http://10.0.0.1:20000/x"));
        assert!(endpoint_of(&wire("not-a-pin")).is_none(), "an unreadable pin: not routed to");
        let set = EndpointSet::from_endpoints([tls, plain, ep("m", "10.0.0.2:1", &[])]);
        let pins: Vec<(&str, String)> = set.pins().map(|(a, p)| (a, p.hex())).collect();
        assert_eq!(pins, [("10.0.0.1:20000", pin)]);
    }

    #[test]
    fn adapters_resolve_to_the_endpoints_that_loaded_them() {
        let set = EndpointSet::from_endpoints([
            ep("base", "a:1", &["sql"]),
            ep("base", "b:1", &[]),
            ep("other", "c:1", &[]),
            ep("base", "a:1", &["sql"]),
        ]);
        assert_eq!(set.len(), 3);
        assert_eq!(set.resolve("base").unwrap().endpoints.len(), 2);
        let r = set.resolve("sql").unwrap();
        assert_eq!((r.base_model.as_str(), r.adapter.as_ref().map(AdapterName::as_str)), ("base", Some("sql")));
        assert_eq!(r.endpoints.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["a:1"]);
        assert!(set.resolve("nope").is_none());
        assert_eq!(
            set.listing(),
            vec![("base".into(), None), ("other".into(), None), ("sql".into(), Some("base".into()))]
        );
    }
}
