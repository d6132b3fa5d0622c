//! The kinds of objects the store holds.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// A kind of object. Users apply `Model`, `Adapter` and `Tenant`; flotilla itself writes
/// `Node` (agents register them) and `Replica` (controllers place them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Model,
    Adapter,
    Tenant,
    Node,
    Replica,
    /// A bearer token for the gRPC API (its hash; see `spec::TokenSpec`).
    Token,
    /// A member cluster of a federation (federation servers only; `spec::ClusterSpec`).
    Cluster,
    /// A Model template spread over a federation's clusters (federation servers only).
    FederatedModel,
    /// An Adapter kept wherever its base FederatedModel runs (federation servers only).
    FederatedAdapter,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Model,
        Kind::Adapter,
        Kind::Tenant,
        Kind::Node,
        Kind::Replica,
        Kind::Token,
        Kind::Cluster,
        Kind::FederatedModel,
        Kind::FederatedAdapter,
    ];

    /// Whether users write this kind with `apply` (the others are managed by flotilla).
    pub fn user_applied(self) -> bool {
        !matches!(self, Kind::Node | Kind::Replica)
    }

    /// Whether a server of this mode (a federation server, `flotilla server --federation`,
    /// or a cluster's) holds objects of this kind: Clusters and FederatedModels only a
    /// federation's, tokens both, the rest only a cluster's.
    pub fn held_by(self, federation: bool) -> bool {
        match self {
            Kind::Token => true,
            Kind::Cluster | Kind::FederatedModel | Kind::FederatedAdapter => federation,
            _ => !federation,
        }
    }

    /// Status fields of this kind that hold secrets (a replica's engine key). They are stored
    /// in Raft with the object, where the controllers read them, and removed from the wire
    /// form every client read path returns (see [`crate::object`]).
    pub fn secret_status_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Replica => &["api_key", "gang_token"],
            Kind::Model
            | Kind::Adapter
            | Kind::Tenant
            | Kind::Node
            | Kind::Token
            | Kind::Cluster
            | Kind::FederatedModel
            | Kind::FederatedAdapter => &[],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Model => "Model",
            Kind::Adapter => "Adapter",
            Kind::Tenant => "Tenant",
            Kind::Node => "Node",
            Kind::Replica => "Replica",
            Kind::Token => "Token",
            Kind::Cluster => "Cluster",
            Kind::FederatedModel => "FederatedModel",
            Kind::FederatedAdapter => "FederatedAdapter",
        }
    }
}

impl FromStr for Kind {
    type Err = ApiError;

    /// Accepts the kind name in any case, singular or plural (`Model`, `model`, `models`),
    /// `fedmodel(s)` for `FederatedModel` and `fedadapter(s)` for `FederatedAdapter`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        match singular {
            "fedmodel" => return Ok(Kind::FederatedModel),
            "fedadapter" => return Ok(Kind::FederatedAdapter),
            _ => {}
        }
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(singular))
            .ok_or_else(|| ApiError::UnknownKind(s.to_owned()))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_any_case_and_plural() {
        assert_eq!("models".parse::<Kind>().unwrap(), Kind::Model);
        assert_eq!("Tenant".parse::<Kind>().unwrap(), Kind::Tenant);
        assert_eq!("ADAPTER".parse::<Kind>().unwrap(), Kind::Adapter);
        assert!(matches!("Gadget".parse::<Kind>(), Err(ApiError::UnknownKind(_))));
        assert_eq!("clusters".parse::<Kind>().unwrap(), Kind::Cluster);
        assert_eq!("fedmodel".parse::<Kind>().unwrap(), Kind::FederatedModel);
        assert_eq!("FederatedModels".parse::<Kind>().unwrap(), Kind::FederatedModel);
    }
}
