//! The CLI's error: a message for stderr and an exit code (1 runtime, 2 invalid input).
use tonic::Code;

#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) exit_code: u8,
    pub(crate) message: String,
}

impl CliError {
    /// Bad usage or invalid input: exit code 2.
    pub(crate) fn usage(message: impl Into<String>) -> CliError {
        CliError { exit_code: 2, message: message.into() }
    }

    /// A runtime failure: exit code 1.
    pub(crate) fn runtime(message: impl Into<String>) -> CliError {
        CliError { exit_code: 1, message: message.into() }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> CliError {
        let message = if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_owned() };
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange => CliError::usage(message),
            _ => CliError::runtime(message),
        }
    }
}

impl From<flotilla_api::ApiError> for CliError {
    fn from(e: flotilla_api::ApiError) -> CliError {
        CliError::usage(e.to_string())
    }
}

impl From<flotilla_cluster::ClusterError> for CliError {
    fn from(e: flotilla_cluster::ClusterError) -> CliError {
        match e.grpc_code() {
            Code::InvalidArgument => CliError::usage(e.to_string()),
            _ => CliError::runtime(e.to_string()),
        }
    }
}

/// Errors of the role crates that know whether they are usage errors (exit 2).
macro_rules! usage_aware_error {
    ($($t:ty),*) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> CliError {
                if e.is_usage() {
                    CliError::usage(e.to_string())
                } else {
                    CliError::runtime(e.to_string())
                }
            }
        }
    )*};
}

usage_aware_error!(flotilla_sim::SimError, flotilla_agent::AgentError, flotilla_gateway::GatewayError);
