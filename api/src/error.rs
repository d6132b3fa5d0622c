//! Errors of parsing and validating user input. Each variant has a stable code used in gRPC
//! status messages, metrics labels and CLI output.
use thiserror::Error;

/// An invalid manifest, name, kind or selector. Every message is one sentence naming the
/// offending field or value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ApiError {
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("unknown kind {0:?}; expected one of Model, Adapter, Tenant")]
    UnknownKind(String),
    #[error("manifest is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

impl ApiError {
    /// Stable machine-readable code of the error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Parse(_) => "api.parse",
            ApiError::Invalid { .. } => "api.invalid",
            ApiError::UnknownKind(_) => "api.unknown_kind",
            ApiError::TooLarge { .. } => "api.too_large",
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid { field: field.into(), message: message.into() }
    }
}
