//! `kind: Tenant`: a consumer of the gateway with limits and a priority class.
use serde::{Deserialize, Serialize};

use super::at_most;
use crate::{ApiError, ObjectName};

/// Request priority class, highest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PriorityClass {
    Critical,
    #[default]
    Standard,
    Batch,
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
}

impl TenantSpec {
    pub fn validate(&self) -> Result<(), ApiError> {
        at_most("spec.rpm", self.rpm, 100_000_000)?;
        at_most("spec.tpm", self.tpm, 100_000_000_000)?;
        at_most("spec.models", self.models.len(), 10_000)
    }
}
