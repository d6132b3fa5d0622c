//! openraft's storage conformance suite, run on the sled log store and state machine (the
//! restart tests with a real single-member Raft are in `restart.rs`).
use flotilla_storage::{LogStore, StateMachine, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tempfile::TempDir;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm) = flotilla_storage::open(dir.path(), 1000).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_store_passes_openraft_suite() -> Result<(), StorageError<u64>> {
    Suite::test_all(SledBuilder)
}
