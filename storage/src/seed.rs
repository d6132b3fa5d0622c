//! Seeding a data dir as the first member of a new cluster, in two cases:
//!
//! - **Restore** (`flotilla snapshot restore FILE --data-dir D --id N`): [`prepare_restore`]
//!   checks the backup and writes it, with the server ID it is for, under `D/restore/` in an
//!   otherwise empty dir. The server's first start with that dir ([`open_server`]) seeds it.
//! - **Force new cluster** (`flotilla server --force-new-cluster`): a member of a group that
//!   lost its majority for good keeps its state, applies every entry still in its log (they
//!   may have been committed by the old majority: it cannot know), and becomes a group of one.
//!
//! Seeding writes the state machine's snapshot file at a log id `L` whose membership is this
//! server alone (at the address it advertises), then empties the log, recording it as purged
//! and committed up to `L`, with a vote of a higher term for itself:
//!
//! ```text
//!   snapshot/current  ── last_log_id L, membership {N: addr}, data = the Store (revisions kept)
//!   raft tree         ── last_purged = committed = L, vote = (term+1, N)
//!   log tree          ── empty
//! ```
//!
//! openraft then starts a single voter that elects itself; a server that joins later gets
//! the state as a Raft snapshot (its log starts after `L`). Seeding is idempotent: a crash in
//! the middle leaves a dir that seeds again at the next start (the snapshot is written
//! first; a pending restore is removed last).
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};
use openraft::{BasicNode, CommittedLeaderId, LogId, Membership, StoredMembership, Vote};

use crate::snapshot_file::{self, Meta};
use crate::{backup, checksum, format, LogStore, StateMachine, StorageError, Store};

const RESTORE: &str = "restore";

/// How a server starts on its data dir.
#[derive(Debug, Clone)]
pub struct StartAs {
    /// Its Raft ID.
    pub id: u64,
    /// The address other members reach it at (its membership entry).
    pub addr: String,
    /// Rewrite the membership to this server alone (`--force-new-cluster`).
    pub force_new_cluster: bool,
}

/// What [`open_server`] did to the data dir before handing it to openraft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seeded {
    Nothing,
    /// A pending restore became a new single-member cluster at this store revision.
    Restored {
        revision: u64,
    },
    /// The membership was rewritten to this server alone, after applying `replayed` log
    /// entries that had not been applied (committed or not).
    ForcedNewCluster {
        revision: u64,
        last_index: u64,
        replayed: usize,
    },
}

/// Whether `data_dir` holds a restore that the server's first start will seed.
pub fn pending_restore(data_dir: &Path) -> bool {
    data_dir.join(RESTORE).join("id").exists()
}

/// Writes the backup file `bytes` into the empty (or absent) `data_dir` as a pending restore
/// for server `id`. Checks everything first (the file's checksum and format, its data, the
/// dir empty) and writes nothing if any check fails; errors are sentences without the file's
/// name, which the caller adds.
pub fn prepare_restore(data_dir: &Path, id: u64, bytes: &[u8]) -> Result<u64, StorageError> {
    let b = backup::decode(bytes).map_err(|e| StorageError::Seed(e.to_string()))?;
    serde_json::from_slice::<Store>(&b.data).map_err(|e| StorageError::Seed(format!("unreadable data: {e}")))?;
    if id == 0 {
        return Err(StorageError::Seed("--id must be a positive integer".into()));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StorageError::Io { path, source }
    };
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(StorageError::Seed(format!(
                    "data dir {} is not empty: restore seeds a new server, give it an empty or absent dir",
                    data_dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(data_dir)(e)),
    }
    flotilla_security::private_dir::ensure(data_dir).map_err(io(data_dir))?;
    format::ensure(data_dir)?;
    let tmp = data_dir.join(".restore.tmp");
    flotilla_security::private_dir::ensure(&tmp).map_err(io(&tmp))?;
    format::write_private(&tmp.join("backup"), bytes).map_err(io(&tmp))?;
    format::write_private(&tmp.join("id"), format!("{id}\n").as_bytes()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, data_dir.join(RESTORE)).map_err(io(data_dir))?;
    std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(io(data_dir))?;
    Ok(b.header.revision)
}

/// Opens a server's data dir ([`crate::open`]) and seeds it first if it holds a pending
/// restore or `start.force_new_cluster` is set.
pub async fn open_server(
    data_dir: &Path,
    retention: usize,
    start: &StartAs,
) -> Result<(LogStore, StateMachine, Seeded), StorageError> {
    let (db, mut log, mut sm) = crate::open_parts(data_dir, retention)?;
    let seeded = if pending_restore(data_dir) {
        restore(data_dir, &db, &log, start).await?
    } else if start.force_new_cluster {
        force(data_dir, &db, &mut log, &mut sm, start).await?
    } else {
        return Ok((log, sm, Seeded::Nothing));
    };
    // Fresh handles over the rewritten trees and snapshot (no cached entries or state).
    drop((log, sm));
    let log = LogStore::open(db.clone())?;
    let sm = StateMachine::open(db, data_dir.join("snapshot"), retention)?;
    if pending_restore(data_dir) {
        let dir = data_dir.join(RESTORE);
        std::fs::remove_dir_all(&dir).map_err(|source| StorageError::Io { path: dir, source })?;
    }
    Ok((log, sm, seeded))
}

fn raft(e: impl std::fmt::Display) -> StorageError {
    StorageError::Seed(e.to_string())
}

async fn restore(data_dir: &Path, db: &sled::Db, log: &LogStore, start: &StartAs) -> Result<Seeded, StorageError> {
    let dir = data_dir.join(RESTORE);
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| StorageError::Io { path, source })
    };
    let for_id = String::from_utf8_lossy(&read("id")?).trim().parse::<u64>().unwrap_or(0);
    if for_id != start.id {
        return Err(StorageError::Seed(format!(
            "data dir {} holds a backup restored for server {for_id}; start it with --id {for_id}",
            data_dir.display()
        )));
    }
    // State beside a pending restore can only be an earlier seeding of it that crashed
    // before the pending restore was removed (the server does not start Raft before that):
    // it is seeded again, from the same backup.
    let bytes = read("backup")?;
    let b = backup::decode(&bytes).map_err(|e| StorageError::Seed(format!("{}: {e}", dir.join("backup").display())))?;
    let store: Store = serde_json::from_slice(&b.data).map_err(raft)?;
    let last = LogId::new(CommittedLeaderId::new(1, start.id), 1);
    reseed(db, log, data_dir, start, b.data, store.revision(), last, 1).await?;
    tracing::info!(id = start.id, revision = store.revision(), "seeded a new cluster from a restored backup");
    Ok(Seeded::Restored { revision: store.revision() })
}

async fn force(
    data_dir: &Path,
    db: &sled::Db,
    log: &mut LogStore,
    sm: &mut StateMachine,
    start: &StartAs,
) -> Result<Seeded, StorageError> {
    let (applied, _) = sm.applied_state().await.map_err(raft)?;
    let last_log = log.get_log_state().await.map_err(raft)?.last_log_id;
    let Some(last) = applied.max(last_log) else {
        return Err(StorageError::Seed(format!(
            "--force-new-cluster needs a data dir that holds a cluster; {} holds none (start a new one with --bootstrap)",
            data_dir.display()
        )));
    };
    // Entries after the applied state: committed by the old group or not, they are all
    // kept (as etcd's --force-new-cluster does); see docs/deploy.md for the risk.
    let from = applied.map_or(0, |l| l.index + 1);
    let entries = log.try_get_log_entries(from..=last.index).await.map_err(raft)?;
    let replayed = entries.len();
    sm.apply(entries).await.map_err(raft)?;
    let (data, revision) = sm.reader().export().map_err(raft)?;
    let term = log.read_vote().await.map_err(raft)?.map_or(0, |v| v.leader_id.term).max(last.leader_id.term);
    reseed(db, log, data_dir, start, data, revision, last, term).await?;
    tracing::warn!(id = start.id, revision, last_index = last.index, replayed, "forced a new single-member cluster");
    Ok(Seeded::ForcedNewCluster { revision, last_index: last.index, replayed })
}

/// Writes the snapshot at `last` with this server as the only member, then resets the log
/// to it with a vote for this server in a term after `term`.
#[allow(clippy::too_many_arguments)]
async fn reseed(
    db: &sled::Db,
    log: &LogStore,
    data_dir: &Path,
    start: &StartAs,
    data: Vec<u8>,
    revision: u64,
    last: LogId<u64>,
    term: u64,
) -> Result<(), StorageError> {
    let members =
        Membership::new(vec![BTreeSet::from([start.id])], BTreeMap::from([(start.id, BasicNode::new(&start.addr))]));
    let base = format!("{}-{}-{}", last.leader_id.term, last.index, revision);
    let meta = Meta {
        last_log_id: Some(last),
        last_membership: StoredMembership::new(Some(last), members),
        snapshot_id: checksum::tagged_id(&base, &data),
    };
    let dir = data_dir.join("snapshot");
    snapshot_file::save(&dir, &meta, &data).map_err(|source| StorageError::Io { path: dir, source })?;
    log.reset_to(last, Vote::new(term + 1, start.id))?;
    db.open_tree("sm")?.clear()?;
    db.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use openraft::storage::{RaftLogStorage, RaftStateMachine};

    use super::*;
    use crate::backup::Header;
    use crate::Command;

    fn backup_of(store: &Store) -> Vec<u8> {
        let header = Header {
            revision: store.revision(),
            bytes: 0,
            sha256: String::new(),
            created_at_ms: 0,
            answered_by: 9,
            format: 0,
        };
        backup::encode(header, &serde_json::to_vec(store).unwrap())
    }

    fn start(id: u64) -> StartAs {
        StartAs { id, addr: format!("10.0.0.{id}:7070"), force_new_cluster: false }
    }

    #[tokio::test]
    async fn a_restored_dir_starts_as_a_single_member_at_the_backup_revision() {
        let mut store = Store::new(100);
        for name in ["a", "b", "a"] {
            store.apply(&Command::Put {
                key: flotilla_api::ObjectKey { kind: flotilla_api::Kind::Tenant, name: name.parse().unwrap() },
                uid: format!("uid-{name}"),
                labels: Default::default(),
                spec: serde_json::json!({ "rpm": store.revision() }),
                expected_revision: None,
            });
        }
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        assert_eq!(prepare_restore(&dir, 2, &backup_of(&store)).unwrap(), 3);
        assert!(pending_restore(&dir));
        let e = prepare_restore(&dir, 2, &backup_of(&store)).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        let e = open_server(&dir, 100, &start(1)).await.err().expect("wrong id").to_string();
        assert!(e.contains("restored for server 2") && e.contains("--id 2"), "{e}");

        // A first seeding that crashed before removing the pending restore is done again.
        let (_, _, seeded) = open_server(&dir, 100, &start(2)).await.unwrap();
        assert_eq!(seeded, Seeded::Restored { revision: 3 });
        let pending = dir.join(RESTORE);
        std::fs::create_dir(&pending).unwrap();
        std::fs::write(pending.join("id"), "2\n").unwrap();
        std::fs::write(pending.join("backup"), backup_of(&store)).unwrap();

        let (mut log, mut sm, seeded) = open_server(&dir, 100, &start(2)).await.unwrap();
        assert_eq!(seeded, Seeded::Restored { revision: 3 });
        assert!(!pending_restore(&dir), "consumed");
        assert_eq!(sm.reader().revision(), 3);
        assert_eq!(sm.reader().export().unwrap().0, serde_json::to_vec(&store).unwrap(), "every object as it was");
        let (applied, membership) = sm.applied_state().await.unwrap();
        let last = applied.expect("seeded at a log id");
        assert_eq!(membership.membership().voter_ids().collect::<Vec<_>>(), [2]);
        assert_eq!(membership.membership().get_node(&2).unwrap().addr, "10.0.0.2:7070");
        let state = log.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(last), Some(last)), "log starts after it");
        assert_eq!(log.read_vote().await.unwrap().map(|v| (v.leader_id.term, v.leader_id.node_id)), Some((2, 2)));
        drop((log, sm));

        // Restarted: nothing to seed again, the state is there.
        let (_, sm, seeded) = open_server(&dir, 100, &start(2)).await.unwrap();
        assert_eq!((seeded, sm.reader().revision()), (Seeded::Nothing, 3));
    }

    #[tokio::test]
    async fn a_damaged_backup_writes_nothing_and_force_needs_a_cluster() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        let mut bytes = backup_of(&Store::new(10));
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let e = prepare_restore(&dir, 1, &bytes).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        assert!(!dir.exists(), "nothing written");

        let forced = StartAs { force_new_cluster: true, ..start(1) };
        let e = open_server(&dir, 10, &forced).await.err().expect("empty dir").to_string();
        assert!(e.contains("holds none"), "{e}");
    }

    fn put(index: u64, term: u64, name: &str) -> openraft::Entry<crate::TypeConfig> {
        let cmd = Command::Put {
            key: flotilla_api::ObjectKey { kind: flotilla_api::Kind::Tenant, name: name.parse().unwrap() },
            uid: format!("uid-{name}"),
            labels: Default::default(),
            spec: serde_json::json!({}),
            expected_revision: None,
        };
        openraft::Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 2), index),
            payload: openraft::EntryPayload::Normal(cmd),
        }
    }

    #[tokio::test]
    async fn force_new_cluster_applies_the_whole_log_and_leaves_this_server_alone() {
        use openraft::RaftSnapshotBuilder;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        {
            // A member of {1, 2, 3} that applied (and snapshotted) entries 1-2 of term 3 and
            // holds 3-4 in its log, unapplied; its vote is for server 2 in term 3.
            let (db, _log, mut sm) = crate::open_parts(&dir, 100).unwrap();
            let old = Membership::new(vec![BTreeSet::from([1, 2, 3])], ());
            let mut entries = vec![openraft::Entry {
                log_id: LogId::new(CommittedLeaderId::new(3, 2), 1),
                payload: openraft::EntryPayload::Membership(old),
            }];
            entries.extend([put(2, 3, "a"), put(3, 3, "b"), put(4, 3, "c")]);
            let tree = db.open_tree("log").unwrap();
            for e in &entries {
                tree.insert(e.log_id.index.to_be_bytes(), serde_json::to_vec(e).unwrap()).unwrap();
            }
            sm.apply(entries[..2].to_vec()).await.unwrap();
            sm.build_snapshot().await.unwrap();
            let vote = Vote::new_committed(3, 2);
            db.open_tree("raft").unwrap().insert(b"vote", serde_json::to_vec(&vote).unwrap()).unwrap();
            db.flush().unwrap();
        }
        let forced = StartAs { force_new_cluster: true, ..start(1) };
        let (mut log, mut sm, seeded) = open_server(&dir, 100, &forced).await.unwrap();
        assert_eq!(seeded, Seeded::ForcedNewCluster { revision: 3, last_index: 4, replayed: 2 });
        assert_eq!(sm.reader().revision(), 3, "the unapplied entries were applied");
        let (applied, membership) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(4));
        assert_eq!(membership.membership().voter_ids().collect::<Vec<_>>(), [1]);
        let state = log.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (applied, applied));
        let vote = log.read_vote().await.unwrap().unwrap();
        assert_eq!((vote.leader_id.term, vote.leader_id.node_id, vote.committed), (4, 1, false));
    }
}
