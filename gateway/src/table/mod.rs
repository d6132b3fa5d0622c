//! The table the data plane routes on, written by discovery (cluster watch or static
//! backends) and read by every request:
//!
//! ```text
//! endpoints.rs  Endpoint, EndpointSet: ready engines per model, their adapters and load
//! tenants.rs    Tenants: Tenant objects by hashed API key
//! directory.rs  Directory: the published EndpointSet (carry_over, lora::Overlay), the
//!               watched Model / Tenant / Adapter objects, the change generation
//! ```

mod directory;
mod endpoints;
mod tenants;

pub use directory::{carry_over, Directory, ModelInfo, STALE_ENDPOINT_GRACE};
pub use endpoints::{endpoint_of, Endpoint, EndpointId, EndpointSet, EngineLoad, Resolved};
pub use tenants::{Tenant, Tenants};

/// An endpoint of `model` at `addr` holding `adapters` (for tests).
#[cfg(test)]
pub(crate) use endpoints::tests::ep as test_endpoint;
