//! What a caller may read of an object. Tenants' API key hashes are for gateways (which
//! authenticate requests with them) and for servers; with security on, every other identity
//! (admins included) reads each as [`REDACTED`], on every read path of the object service
//! (Get, List, Watch, and the objects Apply and Delete return). With security off there are
//! no identities and nothing to tell a gateway from anyone else: hashes are returned, as the
//! gateways need them (see docs/security.md).

use flotilla_api::pb;
use flotilla_security::{Identity, Role};

/// What a redacted key hash reads as.
pub const REDACTED: &str = "sha256:<redacted>";

/// Whether `caller` may read secrets (None: security is off).
pub fn sees_secrets(caller: Option<&Identity>) -> bool {
    caller.is_none_or(|id| matches!(id.role, Role::Gateway | Role::Peer))
}

/// Replaces a tenant's key hashes with [`REDACTED`] (other kinds are left as they are).
pub fn redact(obj: &mut pb::Object) {
    if obj.kind != "Tenant" {
        return;
    }
    let Ok(mut spec) = serde_json::from_str::<serde_json::Value>(&obj.spec_json) else { return };
    if let Some(keys) = spec.get_mut("api_keys").and_then(serde_json::Value::as_array_mut) {
        keys.iter_mut().for_each(|k| *k = REDACTED.into());
        if let Ok(text) = serde_json::to_string(&spec) {
            obj.spec_json = text;
        }
    }
}

/// [`redact`] unless `caller` may read secrets.
pub fn for_caller(caller: Option<&Identity>, obj: Option<&mut pb::Object>) {
    if let Some(obj) = obj.filter(|_| !sees_secrets(caller)) {
        redact(obj);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> pb::Object {
        pb::Object {
            kind: "Tenant".into(),
            name: "team-a".into(),
            spec_json: r#"{"api_keys":["sha256:abc","sha256:def"],"rpm":5}"#.into(),
            ..Default::default()
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
        redact(&mut t);
        let spec: serde_json::Value = serde_json::from_str(&t.spec_json).unwrap();
        assert_eq!(spec, serde_json::json!({"api_keys": [REDACTED, REDACTED], "rpm": 5}), "the count stays visible");
        let mut m =
            pb::Object { kind: "Model".into(), spec_json: r#"{"api_keys":["x"]}"#.into(), ..Default::default() };
        redact(&mut m);
        assert!(m.spec_json.contains("\"x\""), "other kinds are untouched");
    }
}
