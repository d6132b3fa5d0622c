//! The replicated state machine: an in-memory [`Store`] shared with readers, plus snapshot
//! build and install.
//!
//! Persistence is the snapshot file only (see docs/adr/002): `apply` touches no disk.
//! Snapshot ids carry the SHA-256 of the data (`crate::checksum`): an installed snapshot
//! and the file read at open or sent to a follower are verified against it, and a mismatch
//! is a [`StorageError::CorruptSnapshot`] naming the snapshot id or the file. The
//! log makes every applied entry durable already; on restart the state machine is loaded
//! from the current snapshot and openraft re-applies the log after its `last_log_id`.
//! openraft purges the log only up to a snapshot that is already on disk (`build_snapshot`
//! and `install_snapshot` fsync the file before returning), so the entries after the
//! snapshot are always still in the log.
//!
//! Data dirs written by earlier versions also hold the state machine in sled tree `sm`
//! (keys: `o<kind>/<name>` object, `e<rev:be64>` event, `m:applied`, `m:membership`,
//! `m:revision`, `m:compacted`). It is read at open if it is ahead of the snapshot, and
//! cleared once a snapshot covers it.
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use flotilla_api::{Kind, LabelSelector, ObjectKey, StoredObject, WatchEvent};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder, StoredMembership,
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::checksum::{self, Verified};
use crate::error::raft_io;
use crate::snapshot_file::{self, Loaded, Meta};
use crate::{CommandResult, Compacted, StorageError, Store, TypeConfig};

type RaftResult<T> = Result<T, openraft::StorageError<u64>>;
type Membership = StoredMembership<u64, BasicNode>;

const APPLIED: &[u8] = b"m:applied";
const MEMBERSHIP: &[u8] = b"m:membership";
const REVISION: &[u8] = b"m:revision";
const COMPACTED: &[u8] = b"m:compacted";

struct Inner {
    store: Store,
    last_applied: Option<LogId<u64>>,
    membership: Membership,
}

struct Shared {
    inner: RwLock<Inner>,
    revision_tx: watch::Sender<u64>,
}

/// The lock is taken through these two, which ignore poisoning (as the other crates do with
/// their mutexes): a panic while it is held, a bug in an apply, must not turn every later
/// read of the API servers into a panic too. Readers then see the state as the panicking
/// apply left it; the panic still ends openraft's state machine worker task, so this node
/// applies nothing more (openraft's next command to the state machine fails).
impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The state machine handed to openraft. Clones share state (the clone is the snapshot
/// builder).
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
    /// The legacy write-through tree; empty once a snapshot covers it.
    legacy: sled::Tree,
    snapshot_dir: PathBuf,
}

/// Read access to the applied state, for the API servers. Cheap to clone.
#[derive(Clone)]
pub struct StoreReader {
    shared: Arc<Shared>,
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(bytes)
        .map_err(|source| StorageError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), source })
}

/// A state machine state recovered at open.
struct Recovered {
    store: Store,
    last_applied: Option<LogId<u64>>,
    membership: Membership,
}

/// The state in the current snapshot file, if there is one; a file whose checksum does not
/// match is an error naming it.
fn load_snapshot(dir: &std::path::Path, retention: usize) -> Result<Option<Recovered>, StorageError> {
    let Some(Loaded { meta, data, unverified }) = snapshot_file::load(dir)? else { return Ok(None) };
    if unverified {
        tracing::warn!(
            file = %snapshot_file::current(dir).display(), snapshot = %meta.snapshot_id,
            "snapshot file written by an earlier version carries no checksum; loaded unverified (the next snapshot will carry one)"
        );
    }
    let mut store: Store = decode(b"snapshot", &data)?;
    store.set_retention(retention);
    Ok(Some(Recovered { store, last_applied: meta.last_log_id, membership: meta.last_membership }))
}

/// The state written through to sled tree `sm` by earlier versions, if any.
fn load_legacy(tree: &sled::Tree, retention: usize) -> Result<Option<Recovered>, StorageError> {
    let get = |k: &[u8]| -> Result<Option<sled::IVec>, StorageError> { Ok(tree.get(k)?) };
    let Some(applied) = get(APPLIED)? else { return Ok(None) };
    let last_applied: Option<LogId<u64>> = decode(APPLIED, &applied)?;
    let membership = get(MEMBERSHIP)?.map(|v| decode(MEMBERSHIP, &v)).transpose()?.unwrap_or_default();
    let revision = get(REVISION)?.map(|v| decode(REVISION, &v)).transpose()?.unwrap_or(0);
    let compacted = get(COMPACTED)?.map(|v| decode(COMPACTED, &v)).transpose()?.unwrap_or(0);
    let mut objects = Vec::new();
    for r in tree.scan_prefix(b"o") {
        let (k, v) = r?;
        objects.push(decode::<StoredObject>(&k, &v)?);
    }
    let mut events = Vec::new();
    for r in tree.scan_prefix(b"e") {
        let (k, v) = r?;
        events.push(decode::<WatchEvent>(&k, &v)?);
    }
    let store = Store::from_parts(objects, events, revision, compacted, retention);
    Ok(Some(Recovered { store, last_applied, membership }))
}

impl StateMachine {
    pub(crate) fn open(db: sled::Db, snapshot_dir: PathBuf, retention: usize) -> Result<StateMachine, StorageError> {
        let legacy = db.open_tree("sm")?;
        let snapshot = load_snapshot(&snapshot_dir, retention)?;
        let old = load_legacy(&legacy, retention)?;
        // The newer of the two: the log holds every entry after either of them.
        let recovered = match (snapshot, old) {
            (Some(s), Some(o)) if o.last_applied > s.last_applied => Some(o),
            (Some(s), _) => Some(s),
            (None, o) => o,
        };
        let Recovered { store, last_applied, membership } = recovered.unwrap_or_else(|| Recovered {
            store: Store::new(retention),
            last_applied: None,
            membership: Membership::default(),
        });
        let revision = store.revision();
        let (revision_tx, _) = watch::channel(revision);
        let inner = Inner { store, last_applied, membership };
        Ok(StateMachine { shared: Arc::new(Shared { inner: RwLock::new(inner), revision_tx }), legacy, snapshot_dir })
    }

    pub fn reader(&self) -> StoreReader {
        StoreReader { shared: self.shared.clone() }
    }

    /// Once a snapshot on disk covers the legacy `sm` tree, it is dead weight: clear it.
    fn clear_legacy(&self) -> RaftResult<()> {
        if !self.legacy.is_empty() {
            self.legacy.clear().map_err(|e| raft_io(ErrorSubject::StateMachine, ErrorVerb::Delete, e))?;
        }
        Ok(())
    }

    /// Writes the snapshot file (tmp, fsync, rename, fsync dir) off the async runtime.
    async fn save_snapshot(&self, meta: &Meta, data: Vec<u8>) -> RaftResult<Vec<u8>> {
        let (dir, meta) = (self.snapshot_dir.clone(), meta.clone());
        tokio::task::spawn_blocking(move || snapshot_file::save(&dir, &meta, &data).map(|()| data))
            .await
            .map_err(|e| raft_io(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?
            .map_err(|e| raft_io(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))
    }

    fn notify(&self, revision: u64) {
        self.shared.revision_tx.send_if_modified(|r| {
            let changed = *r != revision;
            *r = revision;
            changed
        });
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> RaftResult<(Option<LogId<u64>>, Membership)> {
        let inner = self.shared.read();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> RaftResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let revision = {
            let mut inner = self.shared.write();
            for entry in entries {
                inner.last_applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::None,
                    EntryPayload::Normal(cmd) => inner.store.apply(&cmd),
                    EntryPayload::Membership(m) => {
                        inner.membership = StoredMembership::new(Some(entry.log_id), m);
                        CommandResult::None
                    }
                };
                results.push(result);
            }
            inner.store.revision()
        };
        self.notify(revision);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> RaftResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<Cursor<Vec<u8>>>) -> RaftResult<()> {
        let data = snapshot.into_inner();
        verify_received(meta, &data)
            .map_err(|e| raft_io(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e))?;
        let sm_err = |e| raft_io(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e);
        let mut store: Store = serde_json::from_slice(&data).map_err(sm_err)?;
        // On disk first: once this returns, openraft may purge the log up to the snapshot.
        self.save_snapshot(meta, data).await?;
        self.clear_legacy()?;
        let revision = {
            let mut inner = self.shared.write();
            store.set_retention(inner.store_retention());
            inner.store = store;
            inner.last_applied = meta.last_log_id;
            inner.membership = meta.last_membership.clone();
            inner.store.revision()
        };
        self.notify(revision);
        tracing::info!(snapshot = %meta.snapshot_id, revision, "installed snapshot");
        Ok(())
    }

    /// The snapshot file, verified (a corrupt one is an error naming it, never sent on).
    async fn get_current_snapshot(&mut self) -> RaftResult<Option<Snapshot<TypeConfig>>> {
        let dir = self.snapshot_dir.clone();
        let loaded = tokio::task::spawn_blocking(move || snapshot_file::load(&dir))
            .await
            .map_err(|e| raft_io(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?
            .map_err(|e| raft_io(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        Ok(loaded.map(|l| Snapshot { meta: l.meta, snapshot: Box::new(Cursor::new(l.data)) }))
    }
}

/// Checks a received snapshot's data against the checksum in its id before it is
/// installed: a mismatch is an error naming the snapshot id; an id without a checksum (sent
/// by an earlier version) is installed with a warning.
fn verify_received(meta: &Meta, data: &[u8]) -> Result<(), StorageError> {
    match checksum::verify(&meta.snapshot_id, data) {
        Ok(Verified::Matches) => Ok(()),
        Ok(Verified::Untagged) => {
            tracing::warn!(snapshot = %meta.snapshot_id, "received snapshot carries no checksum (sent by an earlier version); installing it unverified");
            Ok(())
        }
        Err(m) => Err(StorageError::CorruptSnapshot {
            snapshot: meta.snapshot_id.clone(),
            reason: format!(
                "data checksum mismatch: the id says sha256 {}, the {} bytes received hash to {}",
                m.expected,
                data.len(),
                m.actual
            ),
        }),
    }
}

impl Inner {
    fn store_retention(&self) -> usize {
        self.store.retention()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> RaftResult<Snapshot<TypeConfig>> {
        let (data, meta) = {
            let inner = self.shared.read();
            let data = serde_json::to_vec(&inner.store)
                .map_err(|e| raft_io(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            let base = match inner.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, inner.store.revision()),
                None => format!("empty-{}", inner.store.revision()),
            };
            // The id carries the data's checksum: followers and restarts verify against it.
            let id = checksum::tagged_id(&base, &data);
            let meta =
                Meta { last_log_id: inner.last_applied, last_membership: inner.membership.clone(), snapshot_id: id };
            (data, meta)
        };
        // The snapshot is the state machine's only persistence: it must be on disk before
        // this returns, as openraft then purges the log up to it.
        let data = self.save_snapshot(&meta, data).await?;
        self.clear_legacy()?;
        tracing::info!(snapshot = %meta.snapshot_id, "built snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl StoreReader {
    fn read<T>(&self, f: impl FnOnce(&Inner) -> T) -> T {
        f(&self.shared.read())
    }

    pub fn revision(&self) -> u64 {
        self.read(|i| i.store.revision())
    }

    pub fn last_applied_index(&self) -> u64 {
        self.read(|i| i.last_applied.map_or(0, |l| l.index))
    }

    pub fn get(&self, key: &ObjectKey) -> (Option<StoredObject>, u64) {
        self.read(|i| (i.store.get(key).cloned(), i.store.revision()))
    }

    /// The revision of each object of `keys` (None: absent), under one read lock and
    /// without copying them: for a reader that only wants to know whether they changed.
    pub fn revisions(&self, keys: &[ObjectKey]) -> Vec<Option<u64>> {
        self.read(|i| keys.iter().map(|k| i.store.get(k).map(|o| o.revision)).collect())
    }

    pub fn list(&self, kind: Kind, selector: &LabelSelector) -> (Vec<StoredObject>, u64) {
        self.read(|i| (i.store.list(kind, selector), i.store.revision()))
    }

    /// [`StoreReader::list`] without copying the objects under the lock: for a reader that
    /// parses many of them (the scheduler's round).
    pub fn list_shared(&self, kind: Kind, selector: &LabelSelector) -> (Vec<Arc<StoredObject>>, u64) {
        self.read(|i| (i.store.list_shared(kind, selector), i.store.revision()))
    }

    /// See [`Store::events_after`].
    pub fn events_after(
        &self,
        kind: Option<Kind>,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<WatchEvent>, u64), Compacted> {
        self.read(|i| i.store.events_after(kind, after, limit))
    }

    /// What request `id` did if it already changed state (see [`Store::applied_result`]).
    pub fn applied_result(&self, id: u128, key: Option<&ObjectKey>) -> Option<CommandResult> {
        self.read(|i| i.store.applied_result(id, key))
    }

    /// The whole state as the snapshot format serializes it (a `Store` as JSON) and its
    /// store revision, read under one lock: a consistent point in time (`snapshot save`).
    pub fn export(&self) -> Result<(Vec<u8>, u64), serde_json::Error> {
        self.read(|i| Ok((serde_json::to_vec(&i.store)?, i.store.revision())))
    }

    /// Events at or after `since` about `object` (see [`crate::eventlog::EventLog::query`]),
    /// the oldest revision kept and the store revision.
    pub fn events(&self, since: u64, object: &str, limit: usize) -> (Vec<crate::eventlog::Event>, u64, u64) {
        self.read(|i| (i.store.events_since(since, object, limit), i.store.events_oldest(), i.store.revision()))
    }

    /// Audit entries after `since` (see [`crate::audit::AuditLog::query`]), the oldest
    /// revision still kept, and the store revision.
    pub fn audit(&self, since: u64, who: &str, limit: usize) -> (Vec<crate::audit::Entry>, u64, u64) {
        self.read(|i| (i.store.audit(since, who, limit), i.store.audit_oldest(), i.store.revision()))
    }

    /// A receiver that changes whenever the store revision moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.revision_tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::{CommittedLeaderId, Entry};

    use super::*;
    use crate::Command;

    fn key(name: &str) -> ObjectKey {
        ObjectKey { kind: Kind::Model, name: name.parse().unwrap() }
    }

    fn put(index: u64, name: &str) -> Entry<TypeConfig> {
        let cmd = Command::Put {
            key: key(name),
            uid: format!("uid-{name}"),
            labels: BTreeMap::new(),
            spec: serde_json::json!({ "replicas": 1 }),
            expected_revision: None,
        };
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 0), index), payload: EntryPayload::Normal(cmd) }
    }

    #[tokio::test]
    async fn a_panic_while_the_lock_is_held_leaves_reads_and_applies_working() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let mut sm = StateMachine::open(db, dir.path().join("snapshot"), 100).unwrap();
        let reader = sm.reader();
        sm.apply([put(1, "a")]).await.unwrap();

        let shared = sm.shared.clone();
        let panicked = std::thread::spawn(move || {
            let _held = shared.write();
            panic!("a bug while applying (expected by this test)");
        })
        .join();
        assert!(panicked.is_err());
        assert!(sm.shared.inner.is_poisoned(), "the panic poisoned the lock");

        assert_eq!((reader.revision(), reader.last_applied_index()), (1, 1));
        assert_eq!(reader.get(&key("a")).0.map(|o| o.revision), Some(1));
        assert_eq!(reader.list(Kind::Model, &LabelSelector::default()).0.len(), 1);
        assert_eq!(reader.events_after(None, 0, 10).unwrap().0.len(), 1);
        sm.apply([put(2, "b")]).await.unwrap();
        assert_eq!((reader.revision(), reader.last_applied_index()), (2, 2));
        assert_eq!(sm.applied_state().await.unwrap().0.map(|l| l.index), Some(2));
        assert!(sm.build_snapshot().await.is_ok());
    }

    fn open(dir: &std::path::Path) -> Result<StateMachine, StorageError> {
        let db = sled::Config::new().temporary(true).open().unwrap();
        StateMachine::open(db, dir.join("snapshot"), 100)
    }

    #[tokio::test]
    async fn a_corrupted_snapshot_is_refused_on_install_and_at_open_naming_it() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = open(a_dir.path()).unwrap();
        a.apply([put(1, "a"), put(2, "b")]).await.unwrap();
        let snap = a.build_snapshot().await.unwrap();
        let (meta, data) = (snap.meta.clone(), snap.snapshot.into_inner());
        assert!(meta.snapshot_id.starts_with("1-2-2.sha256-"), "{}", meta.snapshot_id);

        let mut b = open(b_dir.path()).unwrap();
        let mut bad = data.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x20;
        let e = b.install_snapshot(&meta, Box::new(Cursor::new(bad))).await.unwrap_err().to_string();
        assert!(e.contains(&meta.snapshot_id) && e.contains("checksum mismatch"), "{e}");
        assert_eq!(b.reader().revision(), 0, "nothing installed");
        assert!(!b_dir.path().join("snapshot/current").exists(), "nothing saved");
        b.install_snapshot(&meta, Box::new(Cursor::new(data.clone()))).await.unwrap();
        assert_eq!((b.reader().revision(), b.reader().last_applied_index()), (2, 2));
        drop(b);
        assert_eq!(open(b_dir.path()).unwrap().reader().revision(), 2, "a good file loads at open");

        // The file on disk: one flipped byte, and the server refuses to open it.
        let file = a_dir.path().join("snapshot/current");
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        let e = a.get_current_snapshot().await.expect_err("corrupt file refused").to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        let e = open(a_dir.path()).err().expect("corrupt file refused at open");
        assert_eq!(e.code(), "storage.corrupt_snapshot");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    }
}
