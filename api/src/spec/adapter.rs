//! `kind: Adapter`: a LoRA adapter multiplexed onto replicas of a base model.
use serde::{Deserialize, Serialize};

use super::{at_most, model::MAX_REPLICAS, validate_source};
use crate::{ApiError, ObjectName};

fn one() -> u32 {
    1
}

/// The spec of an `Adapter`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// The `Model` whose replicas load this adapter.
    pub base_model: ObjectName,
    /// Where the adapter weights come from.
    pub source: String,
    /// On how many base-model replicas to keep it loaded.
    #[serde(default = "one")]
    pub replicas: u32,
}

impl AdapterSpec {
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_source("spec.source", &self.source)?;
        at_most("spec.replicas", self.replicas, MAX_REPLICAS)
    }
}
