//! What a caller may read of an object. Tenants' API key hashes are for gateways (which
//! authenticate requests with them) and for servers, tokens' hashes for servers only; with
//! security on, every other identity (admins included) reads each as [`REDACTED`], on every
//! read path of the object service
//! (Get, List, Watch, and the objects Apply and Delete return). With security off there are
//! no identities and nothing to tell a gateway from anyone else: hashes are returned, as the
//! gateways need them (see docs/security.md).

use flotilla_api::pb;
use flotilla_security::{Identity, Role};

/// What a redacted key hash reads as.
pub const REDACTED: &str = "sha256:<redacted>";

/// Who may read the secrets of objects: all of them (security off), those of tenants, or
/// none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    All,
    TenantKeys,
    None,
}

/// What `caller` may read (None: security is off).
pub fn secrets_of(caller: Option<&Identity>) -> Secrets {
    match caller.map(|id| id.role) {
        None | Some(Role::Peer) => Secrets::All,
        Some(Role::Gateway) => Secrets::TenantKeys,
        Some(_) => Secrets::None,
    }
}

/// Replaces the secrets of `obj` that `may` does not cover with [`REDACTED`]: a tenant's
/// key hashes, a token's hash.
pub fn redact(may: Secrets, obj: &mut pb::Object) {
    match (obj.kind.as_str(), may) {
        (_, Secrets::All) | ("Tenant", Secrets::TenantKeys) => return,
        ("Tenant", _) | ("Token", _) => {}
        _ => return,
    }
    let Ok(mut spec) = serde_json::from_str::<serde_json::Value>(&obj.spec_json) else { return };
    // a tenant's written keys and its made keys' hashes (ids stay: they name the keys);
    // a token's hash
    if let Some(serde_json::Value::Array(keys)) = spec.get_mut("api_keys") {
        keys.iter_mut().for_each(|k| *k = REDACTED.into());
    }
    if let Some(serde_json::Value::Array(keys)) = spec.get_mut("keys") {
        keys.iter_mut().filter_map(|k| k.get_mut("hash")).for_each(|h| *h = REDACTED.into());
    }
    if let Some(h @ serde_json::Value::String(_)) = spec.get_mut("hash") {
        *h = REDACTED.into();
    }
    if let Ok(text) = serde_json::to_string(&spec) {
        obj.spec_json = text;
    }
}

/// [`redact`] for what `caller` may read.
pub fn for_caller(caller: Option<&Identity>, obj: Option<&mut pb::Object>) {
    if let Some(obj) = obj {
        redact(secrets_of(caller), obj);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> pb::Object {
        pb::Object {
            kind: "Tenant".into(),
            name: "team-a".into(),
            spec_json: r#"{"api_keys":["sha256:abc","sha256:def"],"keys":[{"id":"k1","hash":"sha256:ghi","created_at":3}],"rpm":5}"#.into(),
            ..Default::default()
        }
    }

    #[test]
    fn token_hashes_are_for_servers_only() {
        let token = || pb::Object {
            kind: "Token".into(),
            spec_json: r#"{"hash":"sha256:abc","role":"viewer"}"#.into(),
            ..Default::default()
        };
        for (may, hidden) in [(Secrets::All, false), (Secrets::TenantKeys, true), (Secrets::None, true)] {
            let mut t = token();
            redact(may, &mut t);
            assert_eq!(t.spec_json.contains(REDACTED), hidden, "{may:?}");
        }
    }

    #[test]
    fn only_gateways_and_servers_read_key_hashes() {
        let id = |r| Identity::new(r, "x").unwrap();
        for (caller, sees) in [
            (None, true),
            (Some(id(Role::Gateway)), true),
            (Some(id(Role::Peer)), true),
            (Some(id(Role::Admin)), false),
            (Some(id(Role::Viewer)), false),
            (Some(id(Role::Operator)), false),
        ] {
            let mut t = tenant();
            for_caller(caller.as_ref(), Some(&mut t));
            assert_eq!(!t.spec_json.contains("sha256:abc"), !sees, "{caller:?}");
        }
        let mut t = tenant();
        redact(Secrets::None, &mut t);
        let spec: serde_json::Value = serde_json::from_str(&t.spec_json).unwrap();
        assert_eq!(
            spec,
            serde_json::json!({"api_keys": [REDACTED, REDACTED], "keys": [{"id": "k1", "hash": REDACTED, "created_at": 3}], "rpm": 5}),
            "the count and the made keys' ids stay visible"
        );
        let mut m =
            pb::Object { kind: "Model".into(), spec_json: r#"{"api_keys":["x"]}"#.into(), ..Default::default() };
        redact(Secrets::None, &mut m);
        assert!(m.spec_json.contains("\"x\""), "other kinds are untouched");
    }
}
