//! Recovery from the data dir: the state machine is persisted only by snapshots, so a
//! restarted member rebuilds it from the snapshot file and re-applies the log after it.
//! Every acknowledged write must be there after a restart, whether the log holds entries
//! after the last snapshot, no snapshot was ever taken, or the log was just purged.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::{Kind, ObjectKey, StoredObject};
use flotilla_storage::{Command, CommandResult, Raft, StoreReader, TypeConfig};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use tempfile::TempDir;

/// A single member never sends an RPC.
struct NoNetwork;

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

fn unreachable<E: std::error::Error>() -> RPCError<u64, BasicNode, RaftError<u64, E>> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other("single member")))
}

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoNetwork;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> NoNetwork {
        NoNetwork
    }
}

impl RaftNetwork<TypeConfig> for NoNetwork {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        Err(unreachable())
    }

    async fn vote(&mut self, _rpc: VoteRequest<u64>, _option: RPCOption) -> RpcResult<VoteResponse<u64>> {
        Err(unreachable())
    }
}

/// A single-member Raft on `dir` (bootstrapped if new), with snapshots only when triggered.
async fn start(dir: &Path) -> (Raft, StoreReader) {
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    // openraft's tasks let go of the previous instance's sled handles a little after
    // `shutdown` returns; sled's file lock says when.
    let mut tries = 0;
    let (log, sm) = loop {
        match flotilla_storage::open(dir, 1000) {
            Ok(s) => break s,
            Err(_) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("open store: {e}"),
        }
    };
    let reader = sm.reader();
    let raft = Raft::new(1, Arc::new(config.validate().unwrap()), NoNetwork, log, sm).await.expect("raft");
    if !raft.is_initialized().await.unwrap() {
        let members = BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]);
        raft.initialize(members).await.expect("initialize");
    }
    raft.wait(Some(Duration::from_secs(10))).current_leader(1, "leader").await.expect("becomes leader");
    (raft, reader)
}

fn key(i: u32) -> ObjectKey {
    ObjectKey { kind: Kind::Model, name: format!("m-{i}").parse().unwrap() }
}

/// Writes objects `range` (each one write; every 7th also a batch of two updates) and
/// returns what the acknowledgements said.
async fn write(raft: &Raft, range: std::ops::Range<u32>, acked: &mut BTreeMap<ObjectKey, StoredObject>) {
    for i in range {
        let put = |v: u32| Command::Put {
            key: key(i),
            uid: format!("uid-{i}"),
            labels: BTreeMap::new(),
            spec: serde_json::json!({ "v": v }),
            expected_revision: None,
        };
        let cmd = if i % 7 == 0 { Command::Batch(vec![put(1), put(2)]) } else { put(0) };
        let mut results = match raft.client_write(cmd).await.expect("write").data {
            CommandResult::Batch(r) => r,
            r => vec![r],
        };
        let Some(CommandResult::Put { object, .. }) = results.pop() else { panic!("not a put result") };
        acked.insert(object.key.clone(), object);
    }
}

async fn snapshot_and_purge(raft: &Raft) {
    let applied = raft.metrics().borrow().last_applied.unwrap().index;
    raft.trigger().snapshot().await.unwrap();
    raft.wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= applied), "snapshot built")
        .await
        .unwrap();
    raft.trigger().purge_log(applied).await.unwrap();
    raft.wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= applied), "log purged")
        .await
        .unwrap();
}

/// Restarts the member and checks that it has exactly the acknowledged objects.
async fn restart_and_check(dir: &Path, raft: Raft, acked: &BTreeMap<ObjectKey, StoredObject>) -> (Raft, StoreReader) {
    let last = raft.metrics().borrow().last_applied.unwrap().index;
    raft.shutdown().await.unwrap();
    drop(raft);
    let (raft, reader) = start(dir).await;
    raft.wait(Some(Duration::from_secs(10))).applied_index_at_least(Some(last), "re-applied").await.unwrap();
    let revision = acked.values().map(|o| o.revision).max().unwrap_or(0);
    assert_eq!(reader.revision(), revision, "store revision after restart");
    for (k, want) in acked {
        let (got, _) = reader.get(k);
        assert_eq!(got.as_ref(), Some(want), "{k} after restart");
    }
    (raft, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_every_acknowledged_write() {
    let dir = TempDir::new().unwrap();
    let mut acked = BTreeMap::new();

    // No snapshot yet: everything comes back from the log.
    let (raft, _) = start(dir.path()).await;
    write(&raft, 0..30, &mut acked).await;
    let (raft, _) = restart_and_check(dir.path(), raft, &acked).await;

    // A snapshot, then more entries after it: snapshot + re-applied log.
    snapshot_and_purge(&raft).await;
    write(&raft, 20..60, &mut acked).await;
    let (raft, _) = restart_and_check(dir.path(), raft, &acked).await;

    // Right after a snapshot and purge: the snapshot alone.
    write(&raft, 60..70, &mut acked).await;
    snapshot_and_purge(&raft).await;
    let (raft, _) = restart_and_check(dir.path(), raft, &acked).await;

    // And it keeps working: writes after the restart land on top, and survive another one.
    write(&raft, 65..80, &mut acked).await;
    let (raft, _) = restart_and_check(dir.path(), raft, &acked).await;
    raft.shutdown().await.unwrap();
}
