//! The server's error type. Each variant maps to a stable code (`cluster.*`) that prefixes
//! the gRPC status message, and to a gRPC status code.
use flotilla_api::{ApiError, ObjectKey};
use thiserror::Error;
use tonic::{Code, Status};

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{0} not found")]
    NotFound(ObjectKey),
    #[error("{key} has revision {actual}, not the expected {expected}")]
    Conflict { key: ObjectKey, expected: u64, actual: u64 },
    #[error("this server is not the leader and no leader is known; retry shortly")]
    NoLeader,
    #[error("the request was forwarded to server {0}, which is no longer the leader; retry")]
    NotLeader(u64),
    #[error("no answer from the Raft group within {0:?}; the write may or may not have been applied")]
    Timeout(std::time::Duration),
    #[error("the request took effect at store revision {0}, but this retry can no longer rebuild its answer; read the object to see its state")]
    OutcomeUnknown(u64),
    #[error("revision {requested} was compacted (history starts after {compacted}); list again and watch from the list's revision")]
    Compacted { requested: u64, compacted: u64 },
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(#[from] flotilla_storage::StorageError),
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

impl ClusterError {
    pub fn code(&self) -> &'static str {
        match self {
            ClusterError::InvalidArgument(_) => "cluster.invalid_argument",
            ClusterError::Api(e) => e.code(),
            ClusterError::NotFound(_) => "cluster.not_found",
            ClusterError::Conflict { .. } => "cluster.conflict",
            ClusterError::NoLeader => "cluster.no_leader",
            ClusterError::NotLeader(_) => "cluster.not_leader",
            ClusterError::Timeout(_) => "cluster.timeout",
            ClusterError::OutcomeUnknown(_) => "cluster.outcome_unknown",
            ClusterError::Compacted { .. } => "cluster.compacted",
            ClusterError::Raft(_) => "cluster.raft",
            ClusterError::Storage(e) => e.code(),
            ClusterError::Bind { .. } => "cluster.bind",
        }
    }

    pub fn grpc_code(&self) -> Code {
        match self {
            ClusterError::InvalidArgument(_) | ClusterError::Api(_) => Code::InvalidArgument,
            // A data dir of a newer format, a restored dir started with the wrong flags.
            ClusterError::Storage(e) if e.is_usage() => Code::InvalidArgument,
            ClusterError::NotFound(_) => Code::NotFound,
            ClusterError::Conflict { .. } => Code::FailedPrecondition,
            ClusterError::NoLeader
            | ClusterError::NotLeader(_)
            | ClusterError::Raft(_)
            | ClusterError::OutcomeUnknown(_) => Code::Unavailable,
            ClusterError::Timeout(_) => Code::DeadlineExceeded,
            ClusterError::Compacted { .. } => Code::OutOfRange,
            ClusterError::Storage(_) | ClusterError::Bind { .. } => Code::Internal,
        }
    }
}

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Status {
        Status::new(e.grpc_code(), format!("{}: {e}", e.code()))
    }
}
