//! `kind: Tenant`: a consumer of the gateway with limits and a priority class.
use serde::{Deserialize, Serialize};

use super::at_most;
use crate::{ApiError, ObjectName};

/// Request priority class, highest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PriorityClass {
    Critical,
    #[default]
    Standard,
    /// Dropped first when engines saturate.
    Sheddable,
}

impl std::str::FromStr for PriorityClass {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "critical" => Ok(PriorityClass::Critical),
            "standard" => Ok(PriorityClass::Standard),
            "sheddable" => Ok(PriorityClass::Sheddable),
            other => {
                Err(ApiError::invalid("priority", format!("{other:?} is not one of critical, standard, sheddable")))
            }
        }
    }
}

/// Prefix of a stored (hashed) API key.
pub const HASHED_KEY_PREFIX: &str = "sha256:";

/// The stored form of an API key: `sha256:<hex of SHA-256 of the key>`.
pub fn hash_api_key(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    format!("{HASHED_KEY_PREFIX}{}", crate::hex(&digest))
}

/// Prefix of a key made by `flotilla tenant key create`: `ftk_<16 hex id>_<64 hex secret>`.
pub const TENANT_KEY_PREFIX: &str = "ftk_";

/// A key the server made (`flotilla tenant key create`); only its hash is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantKey {
    /// The key's public id (16 hex digits, also inside the key): how `get tenant` shows it
    /// and `tenant key revoke` names it.
    pub id: String,
    /// `sha256:<hex>` of the whole key.
    pub hash: String,
    /// Unix seconds when it was made.
    #[serde(default)]
    pub created_at: u64,
}

/// The spec of a `Tenant`. A limit of 0 or absent means unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// Requests per minute.
    #[serde(default)]
    pub rpm: u64,
    /// Tokens (prompt + completion) per minute.
    #[serde(default)]
    pub tpm: u64,
    #[serde(default)]
    pub priority: PriorityClass,
    /// Models and adapters the tenant may use; empty allows all.
    #[serde(default)]
    pub models: Vec<ObjectName>,
    /// API keys (`Authorization: Bearer KEY`). Written in plain text or as
    /// `sha256:<hex>`; the server stores only the hashed form.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Keys made by the server (`flotilla tenant key create`), by id. Written by that
    /// command, not by hand.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<TenantKey>,
    /// Requests of the tenant in flight at once on the gateways (each gateway allows its
    /// share, like `rpm`); past it, 429. Absent: the gateway's `--tenant-max-concurrency`;
    /// 0: unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
}

/// Highest `max_concurrent_requests` a tenant may be given.
pub const MAX_TENANT_CONCURRENCY: u32 = 1_000_000;

impl TenantSpec {
    pub fn validate(&self) -> Result<(), ApiError> {
        at_most("spec.rpm", self.rpm, 100_000_000)?;
        at_most("spec.tpm", self.tpm, 100_000_000_000)?;
        at_most("spec.models", self.models.len(), 10_000)?;
        at_most("spec.api_keys", self.api_keys.len(), 100)?;
        at_most("spec.keys", self.keys.len(), 100)?;
        let is_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        for (i, k) in self.keys.iter().enumerate() {
            if !is_hex(&k.id, 16) {
                return Err(ApiError::invalid(format!("spec.keys[{i}].id"), "must be 16 hex digits"));
            }
            if !k.hash.strip_prefix(HASHED_KEY_PREFIX).is_some_and(|h| is_hex(h, 64)) {
                return Err(ApiError::invalid(format!("spec.keys[{i}].hash"), "must be sha256:<64 hex digits>"));
            }
            if self.keys[..i].iter().any(|o| o.id == k.id) {
                return Err(ApiError::invalid(format!("spec.keys[{i}].id"), format!("{} appears twice", k.id)));
            }
        }
        if let Some(n) = self.max_concurrent_requests {
            at_most("spec.max_concurrent_requests", n, MAX_TENANT_CONCURRENCY)?;
        }
        for (i, k) in self.api_keys.iter().enumerate() {
            if k.len() < 8 || k.len() > 256 || k.chars().any(char::is_whitespace) {
                return Err(ApiError::invalid(
                    format!("spec.api_keys[{i}]"),
                    "must be 8-256 characters without whitespace",
                ));
            }
        }
        Ok(())
    }

    /// Replaces plain-text API keys by their hashed form (idempotent).
    pub fn hash_keys(&mut self) {
        for k in &mut self.api_keys {
            if !k.starts_with(HASHED_KEY_PREFIX) {
                *k = hash_api_key(k);
            }
        }
    }

    /// Every key hash of this tenant (after [`TenantSpec::hash_keys`]): its `api_keys` and
    /// its server-made `keys`.
    pub fn key_hashes(&self) -> impl Iterator<Item = &str> {
        self.api_keys.iter().map(String::as_str).chain(self.keys.iter().map(|k| k.hash.as_str()))
    }

    /// A key hash held twice by this tenant, with the field that holds the second (after
    /// [`TenantSpec::hash_keys`]).
    pub fn duplicate_key(&self) -> Option<String> {
        let all: Vec<&str> = self.key_hashes().collect();
        (0..all.len()).find(|&i| all[..i].contains(&all[i])).map(|i| self.key_field(i))
    }

    /// The field holding the `i`th of [`TenantSpec::key_hashes`].
    pub fn key_field(&self, i: usize) -> String {
        match i.checked_sub(self.api_keys.len()) {
            None => format!("spec.api_keys[{i}]"),
            Some(j) => format!("spec.keys[{j}]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hashed_once() {
        let mut t = TenantSpec {
            rpm: 0,
            tpm: 0,
            priority: PriorityClass::Standard,
            models: vec![],
            api_keys: vec!["secret-key-1".into()],
            keys: vec![],
            max_concurrent_requests: None,
        };
        t.hash_keys();
        let once = t.api_keys[0].clone();
        assert!(once.starts_with("sha256:") && once.len() == 7 + 64);
        t.hash_keys();
        assert_eq!(t.api_keys[0], once);
        assert_eq!(hash_api_key("secret-key-1"), once);
        assert_eq!(t.duplicate_key(), None);
        let made = TenantKey { id: "0123456789abcdef".into(), hash: once.clone(), created_at: 1 };
        t.keys.push(made.clone());
        assert!(t.validate().is_ok());
        assert_eq!(t.duplicate_key().as_deref(), Some("spec.keys[0]"), "a made key equal to a written one");
        t.keys[0].hash = hash_api_key("other");
        assert_eq!(t.key_hashes().count(), 2);
        t.keys.push(made);
        t.keys[1].hash = hash_api_key("third");
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains("spec.keys[1].id"), "{e}");
    }

    #[test]
    fn max_concurrent_requests_is_optional_and_bounded() {
        let parse = |y: &str| -> Result<TenantSpec, String> {
            let t: TenantSpec = serde_yaml::from_str(y).map_err(|e| e.to_string())?;
            t.validate().map_err(|e| e.to_string())?;
            Ok(t)
        };
        let cases: [(&str, Result<Option<u32>, &str>); 6] = [
            ("{}", Ok(None)),
            ("{max_concurrent_requests: 0}", Ok(Some(0))),
            ("{max_concurrent_requests: 8}", Ok(Some(8))),
            ("{max_concurrent_requests: 1000001}", Err("spec.max_concurrent_requests")),
            ("{max_concurrent_requests: -1}", Err("max_concurrent_requests")),
            ("{max_concurrent_requests: lots}", Err("max_concurrent_requests")),
        ];
        for (y, want) in cases {
            match (parse(y), want) {
                (Ok(t), Ok(n)) => assert_eq!(t.max_concurrent_requests, n, "{y}"),
                (Err(e), Err(w)) => assert!(e.contains(w) || e.contains("invalid"), "{y}: {e}"),
                (got, want) => panic!("{y}: {got:?}, want {want:?}"),
            }
        }
        let t = parse("{}").unwrap();
        assert!(!serde_json::to_string(&t).unwrap().contains("max_concurrent"), "absent stays absent");
    }
}
