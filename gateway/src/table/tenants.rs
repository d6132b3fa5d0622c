//! The tenants the gateway authenticates: `Tenant` objects by the hash of each API key.

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
        let mut by_key = HashMap::new();
        for t in ts {
            let t = Arc::new(t);
            for k in &t.spec.api_keys {
                let hashed = if k.starts_with(flotilla_api::spec::HASHED_KEY_PREFIX) {
                    k.clone()
                } else {
                    flotilla_api::spec::hash_api_key(k)
                };
                by_key.insert(hashed, t.clone());
            }
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
            max_concurrent_requests: None,
        };
        let t = Tenants::from_tenants([
            Tenant { name: "a".into(), spec: spec(&flotilla_api::spec::hash_api_key("key-aaaa-1")) },
            Tenant { name: "b".into(), spec: spec("key-bbbb-1") },
        ]);
        assert_eq!(t.lookup("key-aaaa-1").unwrap().name, "a");
        assert_eq!(t.lookup("key-bbbb-1").unwrap().name, "b");
        assert!(t.lookup("key-cccc-1").is_none());
    }
}
