//! The crate's one error type, [`AgentError`]: a stable code per variant and the
//! usage-versus-runtime split the binary maps onto exit codes 2 and 1.

use std::io;
use std::path::PathBuf;

/// Everything that can stop the agent from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A flag has a value the agent cannot run with (exit code 2).
    #[error("invalid value for --{flag}: {reason}")]
    InvalidConfig {
        /// The flag at fault, without the leading dashes.
        flag: &'static str,
        /// One sentence saying what is wrong, with the offending value.
        reason: String,
    },
    /// A file or directory under the data dir could not be read or written (exit code 1).
    #[error("cannot use {path}: {source}")]
    Io {
        /// The path at fault.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The GPU inventory could not be read (NVML missing or failing) (exit code 1).
    #[error("gpu inventory: {0}")]
    Gpu(String),
    /// The server refused the registration because another live agent uses the node name.
    #[error("node name {node:?} is already registered by another agent (server said: {message})")]
    DuplicateNode {
        /// The node name.
        node: String,
        /// The server's message.
        message: String,
    },
    /// The server refused the registration for a reason retrying cannot fix.
    #[error("server {server} refused the registration: {message}")]
    Refused {
        /// The server address.
        server: String,
        /// The gRPC status and message.
        message: String,
    },
    /// Building an engine command failed (bad template, unknown engine kind).
    #[error("engine {replica}: {reason}")]
    Engine {
        /// The replica.
        replica: String,
        /// Why.
        reason: String,
    },
    /// A task of the agent ended unexpectedly (a bug) (exit code 1).
    #[error("internal error: {0}")]
    Internal(String),
}

impl AgentError {
    /// An [`AgentError::InvalidConfig`] for `flag`.
    pub fn invalid(flag: &'static str, reason: impl Into<String>) -> Self {
        AgentError::InvalidConfig { flag, reason: reason.into() }
    }

    /// An [`AgentError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        AgentError::Io { path: path.into(), source }
    }

    /// True when the error is the operator's input (bad flags): exit code 2.
    pub fn is_usage(&self) -> bool {
        matches!(self, AgentError::InvalidConfig { .. })
    }

    /// The process exit code this error maps to (2 usage, 1 runtime).
    pub fn exit_code(&self) -> i32 {
        if self.is_usage() {
            2
        } else {
            1
        }
    }

    /// A stable machine-readable code for logs and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::InvalidConfig { .. } => "agent.invalid_config",
            AgentError::Io { .. } => "agent.io",
            AgentError::Gpu(_) => "agent.gpu",
            AgentError::DuplicateNode { .. } => "agent.duplicate_node",
            AgentError::Refused { .. } => "agent.refused",
            AgentError::Engine { .. } => "agent.engine",
            AgentError::Internal(_) => "agent.internal",
        }
    }
}
