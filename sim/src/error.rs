//! The crate's one error type, [`SimError`], with a stable code per variant and the
//! usage-versus-runtime split the binary maps onto exit codes 2 and 1.

use std::io;

/// Everything that can stop the simulator from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A flag has a value the simulator cannot run with (exit code 2).
    #[error("invalid value for --{flag}: {reason}")]
    InvalidConfig {
        /// The flag at fault, without the leading dashes.
        flag: &'static str,
        /// One sentence saying what is wrong, with the offending value.
        reason: String,
    },
    /// The listen address could not be resolved or bound (exit code 1).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The `host:port` that was asked for.
        addr: String,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The step-loop task ended unexpectedly (exit code 1).
    #[error("engine task failed: {0}")]
    Engine(String),
    /// The multi-node gang failed: a rank left, the head refused this worker, or the gang
    /// did not form in time (exit code 1).
    #[error("gang failed: {0}")]
    Gang(String),
}

impl SimError {
    /// True when the error is the operator's input (bad flags): exit code 2.
    pub fn is_usage(&self) -> bool {
        matches!(self, SimError::InvalidConfig { .. })
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
            SimError::InvalidConfig { .. } => "sim.invalid_config",
            SimError::Bind { .. } => "sim.bind",
            SimError::Engine(_) => "sim.engine",
            SimError::Gang(_) => "sim.gang",
        }
    }

    pub(crate) fn invalid(flag: &'static str, reason: impl Into<String>) -> Self {
        SimError::InvalidConfig { flag, reason: reason.into() }
    }
}
