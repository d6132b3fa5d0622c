//! The crate's error type. Each variant has a stable code (`actors.*`, or the cluster's
//! `cluster.*`) that prefixes gRPC status messages, and a gRPC status code.
use flotilla_cluster::ClusterError;
use thiserror::Error;
use tonic::{Code, Status};

#[derive(Debug, Error)]
pub enum ActorsError {
    #[error("invalid actors config: {0}")]
    Config(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// A node name is held by another live agent.
    #[error("node name {node} is held by agent {agent_id}, last seen {age_ms} ms ago")]
    NodeNameTaken { node: String, agent_id: String, age_ms: u64 },
    #[error("leader={0}")]
    NotLeader(String),
    #[error("no leader is known; retry shortly")]
    NoLeader,
    /// The write certainly did not apply (conflict, not found, not leader).
    #[error("write refused: {0}")]
    WriteRefused(String),
    /// The write may or may not have applied: the actor stops and is rebuilt from the store.
    #[error("write outcome unknown: {0}")]
    Uncertain(String),
    #[error("stored object {key} is malformed: {why}")]
    Malformed { key: String, why: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl ActorsError {
    pub fn code(&self) -> &'static str {
        match self {
            ActorsError::Config(_) => "actors.config",
            ActorsError::InvalidArgument(_) => "actors.invalid_argument",
            ActorsError::NotFound(_) => "actors.not_found",
            ActorsError::NodeNameTaken { .. } => "actors.node_name_taken",
            ActorsError::NotLeader(_) => "cluster.not_leader",
            ActorsError::NoLeader => "cluster.no_leader",
            ActorsError::WriteRefused(_) => "actors.write_refused",
            ActorsError::Uncertain(_) => "actors.write_uncertain",
            ActorsError::Malformed { .. } => "actors.malformed",
            ActorsError::Cluster(e) => e.code(),
        }
    }

    pub fn grpc_code(&self) -> Code {
        match self {
            ActorsError::Config(_) | ActorsError::Malformed { .. } => Code::Internal,
            ActorsError::InvalidArgument(_) => Code::InvalidArgument,
            ActorsError::NotFound(_) => Code::NotFound,
            ActorsError::NodeNameTaken { .. } => Code::AlreadyExists,
            ActorsError::NotLeader(_) => Code::FailedPrecondition,
            ActorsError::NoLeader | ActorsError::WriteRefused(_) => Code::Unavailable,
            ActorsError::Uncertain(_) => Code::DeadlineExceeded,
            ActorsError::Cluster(e) => e.grpc_code(),
        }
    }

    /// Whether a write that failed this way may still have been committed.
    pub fn is_uncertain(&self) -> bool {
        matches!(self, ActorsError::Uncertain(_))
            || matches!(self, ActorsError::Cluster(ClusterError::Timeout(_) | ClusterError::Raft(_)))
    }

    /// Maps a failed propose: a timeout or Raft error may have committed; the rest did not.
    pub fn from_propose(e: ClusterError) -> ActorsError {
        match e {
            ClusterError::Timeout(_) | ClusterError::Raft(_) => ActorsError::Uncertain(e.to_string()),
            other => ActorsError::WriteRefused(format!("{}: {other}", other.code())),
        }
    }
}

impl From<ActorsError> for Status {
    fn from(e: ActorsError) -> Status {
        Status::new(e.grpc_code(), format!("{}: {e}", e.code()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages_are_stable() {
        let s: Status = ActorsError::NotLeader("127.0.0.1:7070".into()).into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "cluster.not_leader: leader=127.0.0.1:7070");
        let s: Status = ActorsError::NoLeader.into();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().starts_with("cluster.no_leader"));
        let s: Status = ActorsError::NodeNameTaken { node: "n1".into(), agent_id: "a".into(), age_ms: 7 }.into();
        assert_eq!(s.code(), Code::AlreadyExists);
        assert_eq!(s.message(), "actors.node_name_taken: node name n1 is held by agent a, last seen 7 ms ago");
        assert!(ActorsError::from_propose(ClusterError::Timeout(std::time::Duration::from_secs(1))).is_uncertain());
        assert!(!ActorsError::from_propose(ClusterError::NoLeader).is_uncertain());
    }
}
