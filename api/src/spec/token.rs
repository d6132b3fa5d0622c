//! `kind: Token`: a bearer token for the gRPC API, an identity for automation that has no
//! certificate. `flotilla token create` makes the secret on the client, stores only its
//! hash here (the object's name is the token's public id), and prints the token once:
//! `flt_<id>_<secret>`. A server verifies a presented token against the hash and the expiry
//! (`flotilla_cluster`'s token verifier); `flotilla token revoke` deletes the object.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// Prefix of a token.
pub const TOKEN_PREFIX: &str = "flt_";

/// Roles a token may carry (servers and agents identify with certificates).
pub const TOKEN_ROLES: [&str; 4] = ["admin", "operator", "viewer", "gateway"];

/// The spec of a `Token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    /// One of [`TOKEN_ROLES`].
    pub role: String,
    /// The identity's name (who holds it: a person, a CI job).
    pub identity: String,
    /// `sha256:<hex>` of the secret part.
    pub hash: String,
    /// Unix seconds after which the token is refused; absent: never.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Operators only: a label selector (`k=v,...`) every object the token writes must
    /// match, before and after the write. Absent: every Model and Adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

impl TokenSpec {
    pub fn validate(&self) -> Result<(), ApiError> {
        if !TOKEN_ROLES.contains(&self.role.as_str()) {
            return Err(ApiError::invalid(
                "spec.role",
                format!("{:?} is not one of {}", self.role, TOKEN_ROLES.join(", ")),
            ));
        }
        let name_ok = (1..=63).contains(&self.identity.len())
            && self.identity.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
            && self.identity.as_bytes()[0].is_ascii_alphanumeric();
        if !name_ok {
            return Err(ApiError::invalid(
                "spec.identity",
                "must be 1-63 of a-z, 0-9, '-', '.', '_', starting with a letter or digit",
            ));
        }
        if let Some(sel) = &self.selector {
            if self.role != "operator" {
                return Err(ApiError::invalid("spec.selector", "only an operator token can be limited by a selector"));
            }
            let parsed = crate::LabelSelector::parse(sel)?;
            if parsed == crate::LabelSelector::default() || sel.len() > 1024 {
                return Err(ApiError::invalid("spec.selector", "must be 1-1024 characters of k=v pairs"));
            }
        }
        let hex = self.hash.strip_prefix(super::HASHED_KEY_PREFIX).unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::invalid("spec.hash", "must be sha256:<64 hex digits> (the CLI computes it)"));
        }
        Ok(())
    }
}

/// Splits a presented token into (id, secret); None when it is not one.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (ok(id, 16) && ok(secret, 64)).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_tokens_are_checked() {
        let ok = TokenSpec {
            role: "operator".into(),
            identity: "ci-deploy".into(),
            hash: super::super::hash_api_key("x"),
            expires_at: Some(1),
            selector: None,
        };
        assert!(ok.validate().is_ok());
        assert!(TokenSpec { selector: Some("team=search".into()), ..ok.clone() }.validate().is_ok());
        assert!(TokenSpec { selector: Some(String::new()), ..ok.clone() }.validate().is_err(), "empty");
        assert!(TokenSpec { selector: Some("team".into()), ..ok.clone() }.validate().is_err(), "not k=v");
        let viewer = TokenSpec { role: "viewer".into(), selector: Some("team=a".into()), ..ok.clone() };
        assert!(viewer.validate().is_err(), "operators only");
        assert!(TokenSpec { role: "peer".into(), ..ok.clone() }.validate().is_err(), "servers use certificates");
        assert!(TokenSpec { identity: "Bob".into(), ..ok.clone() }.validate().is_err());
        assert!(TokenSpec { hash: "plain".into(), ..ok }.validate().is_err());
        let t = format!("flt_{}_{}", "a".repeat(16), "b".repeat(64));
        assert_eq!(parse_token(&t), Some(("a".repeat(16).as_str(), "b".repeat(64).as_str())));
        assert_eq!(parse_token("flt_x_y"), None);
        assert_eq!(parse_token("Bearer flt_"), None);
    }
}
