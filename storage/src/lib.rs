//! flotilla-storage: the Raft log on sled, and the replicated state machine in memory,
//! persisted by snapshot files.
//!
//! ```text
//!   openraft ──append/truncate/purge──> LogStore      (sled tree "log", fsync per append,
//!                                                      newest entries also in memory)
//!   openraft ──apply/snapshot─────────> StateMachine  (in-memory Store + snapshot file)
//!                                             │
//!   gRPC reads / watches <── StoreReader ─────┘ (shared in-memory Store, revision watch)
//! ```
//!
//! An entry is acknowledged only after the log append is flushed (fsync) on a majority. The
//! state machine touches no disk when it applies: it is persisted by snapshots (written
//! atomically and fsync'd before openraft may purge the log up to them). After a restart it
//! is loaded from the snapshot and openraft re-applies the log after it (docs/adr/002).
#![forbid(unsafe_code)]

mod applied;
pub mod audit;
pub mod backup;
mod checksum;
mod command;
mod error;
pub mod eventlog;
mod format;
mod log_store;
mod objects;
mod revision_log;
pub mod seed;
mod snapshot_file;
mod state_machine;
mod store;

use std::io::Cursor;
use std::path::Path;

pub use applied::KEPT as APPLIED_REQUESTS_KEPT;
pub use checksum::{tagged_id as snapshot_id_with_checksum, SnapshotDigest};
pub use command::{Command, CommandResult, Compare, TxnOp};
pub use error::StorageError;
pub use format::DATA_DIR_FORMAT;
pub use log_store::LogStore;
pub use state_machine::{StateMachine, StoreReader};
pub use store::{Compacted, Store, DEFAULT_EVENT_RETENTION};

openraft::declare_raft_types!(
    /// openraft type configuration of flotilla's Raft group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The openraft handle of a flotilla server.
pub type Raft = openraft::Raft<TypeConfig>;

/// Opens (or creates) the log store and state machine under `data_dir`, which is made
/// private first: created 0700, or tightened to 0700 with a warning if it is group- or
/// world-accessible (see `private_dir`). Its format marker is checked (and written if
/// missing) before anything else in it is read: a dir of a newer format is refused
/// (`format`). A server opens it through [`seed::open_server`].
pub fn open(data_dir: &Path, event_retention: usize) -> Result<(LogStore, StateMachine), StorageError> {
    open_parts(data_dir, event_retention).map(|(_, log, sm)| (log, sm))
}

fn open_parts(data_dir: &Path, event_retention: usize) -> Result<(sled::Db, LogStore, StateMachine), StorageError> {
    flotilla_security::private_dir::ensure(data_dir)
        .map_err(|e| StorageError::Io { path: data_dir.into(), source: e })?;
    format::ensure(data_dir)?;
    let db = sled::Config::new()
        .path(data_dir.join("db"))
        .mode(sled::Mode::LowSpace)
        .open()
        .map_err(|e| StorageError::Open { path: data_dir.into(), source: e })?;
    let log = LogStore::open(db.clone())?;
    let sm = StateMachine::open(db.clone(), data_dir.join("snapshot"), event_retention)?;
    Ok((db, log, sm))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use openraft::RaftSnapshotBuilder;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn the_data_dir_is_private_and_an_open_one_is_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        let (_log, mut sm) = super::open(&dir, 100).unwrap();
        sm.build_snapshot().await.unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("snapshot")), 0o700);
        assert_eq!(mode(&dir.join("snapshot/current")), 0o600);
        drop((_log, sm));

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let reopened = super::open(&dir, 100);
        assert!(reopened.is_ok());
        assert_eq!(mode(&dir), 0o700);
    }
}
