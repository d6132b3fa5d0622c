//! flotilla-cluster: a flotilla server. It runs a member of the Raft group and serves the
//! gRPC API (objects, cluster, the internal Raft transport, health, reflection) and an HTTP
//! endpoint for `/metrics`, `/healthz` and `/readyz`.
//!
//! ```text
//!   gRPC :7070 ─┬─ ObjectService ──┐ writes: propose on the leader, else forward to it
//!               ├─ ClusterService ─┤ reads: read-index on the leader, else forward
//!               ├─ RaftService ────┴──> openraft::Raft ──> flotilla-storage (sled)
//!               ├─ grpc.health.v1, reflection
//!   HTTP :7071 ── /metrics /healthz /readyz
//! ```
#![forbid(unsafe_code)]

mod batcher;
mod campaign;
mod cluster_service;
mod config;
mod error;
pub mod forwarded;
mod handle;
mod http;
mod leader_gone;
mod metrics;
mod network;
mod node;
mod object_service;
mod peers;
mod raft_service;
pub mod redact;
mod scope;
mod server;
mod snapshot_chunks;
mod tenant_keys;
pub mod tokens;
pub mod trace_links;

pub use config::ServerConfig;
pub use error::ClusterError;
pub use handle::ClusterHandle;
pub use server::{start, start_with, Extensions, ServerHandle};

/// gRPC metadata key set on requests a server forwards to the leader, so that they are
/// never forwarded twice.
pub const FORWARDED_HEADER: &str = "x-flotilla-forwarded";

/// gRPC metadata key carrying a write's request id (32 hex digits) on a forward, so that
/// the leader applies it at most once however often the forward is retried
/// (`flotilla_storage::Command::Once`). Honoured only on forwarded requests from a peer.
pub const REQUEST_ID_HEADER: &str = "x-flotilla-request-id";
