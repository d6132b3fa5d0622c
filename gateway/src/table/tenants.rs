//! The tenants the gateway authenticates: `Tenant` objects by the hash of each API key
//! (written ones and those `flotilla tenant key create` made). A key two tenants hold is
//! nobody's: the servers refuse such a write, but a race between two writes could still
//! produce one, and guessing which tenant was meant would bill and limit the wrong one.

use std::collections::HashMap;
use std::sync::Arc;

use flotilla_api::spec::TenantSpec;

/// A tenant as the gateway sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub spec: TenantSpec,
}

/// Tenants by stored key hash (`sha256:<hex>`).
#[derive(Debug, Default)]
pub struct Tenants {
    pub by_key: HashMap<String, Arc<Tenant>>,
}

impl Tenants {
    pub fn from_tenants(ts: impl IntoIterator<Item = Tenant>) -> Self {
        let mut by_key: HashMap<String, Arc<Tenant>> = HashMap::new();
        let mut shared = Vec::new();
        for t in ts {
            let t = Arc::new(t);
            for k in t.spec.key_hashes() {
                let hashed = if k.starts_with(flotilla_api::spec::HASHED_KEY_PREFIX) {
                    k.to_string()
                } else {
                    flotilla_api::spec::hash_api_key(k)
                };
                if let Some(other) = by_key.insert(hashed.clone(), t.clone()).filter(|o| o.name != t.name) {
                    tracing::warn!(tenants = %format!("{}, {}", other.name, t.name), "two tenants hold the same API key; it is refused until one drops it");
                    shared.push(hashed);
                }
            }
        }
        for k in shared {
            by_key.remove(&k);
        }
        Tenants { by_key }
    }

    /// The tenant owning a plain-text key.
    pub fn lookup(&self, key: &str) -> Option<Arc<Tenant>> {
        self.by_key.get(&flotilla_api::spec::hash_api_key(key)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_match_hashed_and_plain_keys() {
        let spec = |k: &str| TenantSpec {
            rpm: 0,
            tpm: 0,
            priority: Default::default(),
            models: vec![],
            api_keys: vec![k.into()],
            keys: vec![],
            max_concurrent_requests: None,
        };
        let t = Tenants::from_tenants([
            Tenant { name: "a".into(), spec: spec(&flotilla_api::spec::hash_api_key("key-aaaa-1")) },
            Tenant { name: "b".into(), spec: spec("key-bbbb-1") },
        ]);
        assert_eq!(t.lookup("key-aaaa-1").unwrap().name, "a");
        assert_eq!(t.lookup("key-bbbb-1").unwrap().name, "b");
        assert!(t.lookup("key-cccc-1").is_none());
        // a server-made key, and a key two tenants hold (nobody's)
        let made = flotilla_api::spec::TenantKey {
            id: "0123456789abcdef".into(),
            hash: flotilla_api::spec::hash_api_key("ftk_made"),
            created_at: 0,
        };
        let t = Tenants::from_tenants([
            Tenant { name: "a".into(), spec: TenantSpec { keys: vec![made], ..spec("key-shared-1") } },
            Tenant { name: "b".into(), spec: spec("key-shared-1") },
        ]);
        assert_eq!(t.lookup("ftk_made").unwrap().name, "a");
        assert!(t.lookup("key-shared-1").is_none(), "a shared key is refused");
    }
}
