//! Who a caller is: a [`Role`] and a name, carried in a certificate as the URI subject
//! alternative name `spiffe://flotilla/<role>/<name>` (SPIFFE's shape, so the identity
//! survives a CA other than `flotilla tls`'s, and is one SAN to check).

use std::fmt;

use x509_parser::extensions::GeneralName;

/// The URI prefix of an identity SAN.
pub const URI_PREFIX: &str = "spiffe://flotilla/";

/// What a caller may do (the table in [`crate::authz`] says which methods each may call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Everything: membership, tenants, tokens.
    Admin,
    /// Models, adapters, scale, drain.
    Operator,
    /// Read only: get, list, watch, status.
    Viewer,
    /// A node's agent: its own session only.
    Agent,
    /// A gateway: endpoint watch, adapter loads, demand reports, tenant reads.
    Gateway,
    /// A server of the cluster: Raft, and calls forwarded to the leader.
    Peer,
}

impl Role {
    /// Every role, in the table's order.
    pub const ALL: [Role; 6] = [Role::Admin, Role::Operator, Role::Viewer, Role::Agent, Role::Gateway, Role::Peer];

    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Agent => "agent",
            Role::Gateway => "gateway",
            Role::Peer => "peer",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A caller's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    /// A node name for agents, a server's id or host for peers, a person or system for the rest.
    pub name: String,
    /// For an operator limited to some objects (a token made with `--selector`): the label
    /// selector (`k=v,...`) every object it writes must match, before and after the write.
    /// Checked by the object service, which knows labels; see docs/security.md.
    pub scope: Option<String>,
}

/// Why a certificate names no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the certificate has no {URI_PREFIX}<role>/<name> URI name")]
    Missing,
    #[error(
        "the certificate's identity {0:?} is not {URI_PREFIX}<role>/<name> with a known role and a DNS-label name"
    )]
    Malformed(String),
}

/// Whether `name` is a name an identity may carry: 1–63 of `a-z0-9-._`, starting
/// alphanumeric.
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

impl Identity {
    pub fn new(role: Role, name: &str) -> Result<Identity, IdentityError> {
        if !valid_name(name) {
            return Err(IdentityError::Malformed(format!("{URI_PREFIX}{role}/{name}")));
        }
        Ok(Identity { role, name: name.to_string(), scope: None })
    }

    /// This identity limited to objects matching the label selector `scope`.
    pub fn with_scope(self, scope: impl Into<String>) -> Identity {
        Identity { scope: Some(scope.into()), ..self }
    }

    /// `spiffe://flotilla/<role>/<name>`.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/{}", self.role, self.name)
    }

    /// Parses an identity URI; None when it is not one of ours at all.
    pub fn from_uri(uri: &str) -> Option<Result<Identity, IdentityError>> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let parsed = rest
            .split_once('/')
            .and_then(|(role, name)| Identity::new(Role::parse(role)?, name).ok())
            .ok_or_else(|| IdentityError::Malformed(uri.to_string()));
        Some(parsed)
    }

    /// The identity a DER certificate names (its first `spiffe://flotilla/` URI SAN).
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let sans = cert.subject_alternative_name().map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        sans.into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .find_map(|n| match n {
                GeneralName::URI(u) => Identity::from_uri(u),
                _ => None,
            })
            .unwrap_or(Err(IdentityError::Missing))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_bad_ones_are_named() {
        let id = Identity::new(Role::Agent, "gpu-node-1").unwrap();
        assert_eq!(id.uri(), "spiffe://flotilla/agent/gpu-node-1");
        assert_eq!(Identity::from_uri(&id.uri()), Some(Ok(id)));
        assert_eq!(Identity::from_uri("spiffe://other/agent/x"), None);
        for bad in [
            "spiffe://flotilla/root/x",
            "spiffe://flotilla/agent/",
            "spiffe://flotilla/agent/A",
            "spiffe://flotilla/agent",
        ] {
            assert!(matches!(Identity::from_uri(bad), Some(Err(IdentityError::Malformed(_)))), "{bad}");
        }
        assert!(!valid_name(&"a".repeat(64)));
        assert!(valid_name("ci.bot-2"));
        assert_eq!(Role::ALL.map(|r| Role::parse(r.as_str())), Role::ALL.map(Some));
    }
}
