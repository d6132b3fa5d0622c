//! Errors of opening and running the store.
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("cannot open the store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record {key:?} in the store: {source}")]
    Corrupt { key: String, source: serde_json::Error },
    /// A snapshot whose checksum does not match (or that cannot be parsed); `snapshot`
    /// names the file or the snapshot id.
    #[error("corrupt snapshot {snapshot}: {reason}")]
    CorruptSnapshot { snapshot: String, reason: String },
    /// A data dir or backup of a format this binary does not read.
    #[error(transparent)]
    Format(#[from] flotilla_api::format::FormatError),
    /// A restored data dir or `--force-new-cluster` that cannot be carried out (the reason
    /// names the dir and what to do).
    #[error("{0}")]
    Seed(String),
}

impl StorageError {
    /// Whether the operator's input is at fault (a data dir of a newer format, a restored
    /// dir started with the wrong flags): exit code 2 rather than 1.
    pub fn is_usage(&self) -> bool {
        matches!(self, StorageError::Format(_) | StorageError::Seed(_))
    }

    pub fn code(&self) -> &'static str {
        match self {
            StorageError::Open { .. } => "storage.open",
            StorageError::Io { .. } => "storage.io",
            StorageError::Sled(_) => "storage.sled",
            StorageError::Corrupt { .. } => "storage.corrupt",
            StorageError::CorruptSnapshot { .. } => "storage.corrupt_snapshot",
            StorageError::Format(_) => "storage.format",
            StorageError::Seed(_) => "storage.seed",
        }
    }
}

/// Converts any error into openraft's storage error for the given subject and verb.
pub(crate) fn raft_io<E: std::error::Error + 'static>(
    subject: openraft::ErrorSubject<u64>,
    verb: openraft::ErrorVerb,
    e: E,
) -> openraft::StorageError<u64> {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}
