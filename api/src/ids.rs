//! Typed identities: object names (DNS labels), Raft node IDs and store revisions.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// The name of an object: a DNS label (RFC 1123): 1-63 characters of lowercase letters,
/// digits and '-', starting and ending with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ObjectName(String);

impl ObjectName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The empty name, which sorts before every valid one; only for range bounds
    /// ([`crate::ObjectKey::first_of`]), never a stored object's name.
    pub(crate) fn before_all() -> ObjectName {
        ObjectName(String::new())
    }

    /// Why `s` is not a DNS label, if it is not (the value quoted, no field named).
    fn check(s: &str) -> Result<(), String> {
        let why = if s.is_empty() {
            "is empty; a name is a DNS label such as \"llama-3-8b\""
        } else if s.len() > 63 {
            "is longer than 63 characters"
        } else if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            "may hold only lowercase letters, digits and '-'"
        } else if s.starts_with('-') || s.ends_with('-') {
            "must start and end with a letter or digit"
        } else {
            return Ok(());
        };
        Err(format!("{s:?} {why}"))
    }
}

impl FromStr for ObjectName {
    type Err = ApiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ObjectName::check(s).map_err(|why| ApiError::invalid("metadata.name", why))?;
        Ok(ObjectName(s.to_owned()))
    }
}

/// The serde form: the error names no field, as serde adds the path of the field at fault
/// (`spec.models[0]`, `metadata.name`).
impl TryFrom<String> for ObjectName {
    type Error = ApiError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ObjectName::check(&s).map_err(ApiError::Parse)?;
        Ok(ObjectName(s))
    }
}

impl From<ObjectName> for String {
    fn from(n: ObjectName) -> String {
        n.0
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The ID of a server in the Raft group (`flotilla server --id N`). Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A store revision: incremented by one for every change to any object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_label_rules() {
        for ok in ["a", "llama-3-8b", "x1", &"a".repeat(63)] {
            assert!(ok.parse::<ObjectName>().is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Llama", "a_b", "a.b", &"a".repeat(64), "ä"] {
            let err = bad.parse::<ObjectName>().unwrap_err().to_string();
            assert!(err.starts_with("metadata.name"), "{bad}: {err}");
        }
    }
}
