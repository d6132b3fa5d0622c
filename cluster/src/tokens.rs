//! Bearer tokens checked against the store's `Token` objects (`flotilla_api::spec::TokenSpec`):
//! the token's id names the object, the SHA-256 of its secret must equal the stored hash
//! (compared in constant time) and the expiry must not have passed. Each server checks its
//! own applied state: a token revoked a moment ago may still pass on a follower that has not
//! applied the deletion yet (milliseconds behind the leader; see docs/security.md).

use flotilla_api::spec::{hash_api_key, parse_token, TokenSpec};
use flotilla_api::{Kind, ObjectKey};
use flotilla_security::{Identity, Role, TokenVerifier};
use flotilla_storage::StoreReader;

/// The verifier the role layer asks.
#[derive(Clone)]
pub struct StoreTokens {
    pub reader: StoreReader,
}

impl std::fmt::Debug for StoreTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreTokens")
    }
}

/// Byte-wise equality that takes the same time wherever the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The identity `spec` grants to a presented `secret` at `now` (unix seconds) (pure).
pub fn grant(spec: &TokenSpec, secret: &str, now: u64) -> Option<Identity> {
    if spec.expires_at.is_some_and(|t| now >= t) {
        return None;
    }
    if !same(hash_api_key(secret).as_bytes(), spec.hash.as_bytes()) {
        return None;
    }
    let identity = Identity::new(Role::parse(&spec.role)?, &spec.identity).ok()?;
    Some(match &spec.selector {
        Some(sel) => identity.with_scope(sel.clone()),
        None => identity,
    })
}

impl TokenVerifier for StoreTokens {
    fn verify(&self, token: &str) -> Option<Identity> {
        let (id, secret) = parse_token(token)?;
        let key = ObjectKey { kind: Kind::Token, name: id.parse().ok()? };
        let (object, _) = self.reader.get(&key);
        let spec: TokenSpec = serde_json::from_value(object?.spec).ok()?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
        grant(&spec, secret, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_must_match_and_the_token_be_unexpired() {
        let spec = TokenSpec {
            role: "operator".into(),
            identity: "ci".into(),
            hash: hash_api_key(&"b".repeat(64)),
            expires_at: Some(1_000),
            selector: None,
        };
        let id = grant(&spec, &"b".repeat(64), 999).expect("valid");
        assert_eq!((id.role, id.name.as_str()), (Role::Operator, "ci"));
        assert_eq!(grant(&spec, &"c".repeat(64), 999), None, "wrong secret");
        assert_eq!(grant(&spec, &"b".repeat(64), 1_000), None, "expired");
        assert!(
            grant(&TokenSpec { expires_at: None, ..spec.clone() }, &"b".repeat(64), u64::MAX).is_some(),
            "no expiry"
        );
        let scoped = TokenSpec { selector: Some("team=a".into()), ..spec };
        assert_eq!(grant(&scoped, &"b".repeat(64), 999).unwrap().scope.as_deref(), Some("team=a"));
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
