//! The Raft log on sled: entries keyed by big-endian index in tree `log`; the vote, the last
//! purged log id and the committed log id in tree `raft`. Every append and vote is flushed
//! (fsync) before openraft is told it is durable.
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::raft_io;
use crate::{StorageError, TypeConfig};

type RaftResult<T> = Result<T, openraft::StorageError<u64>>;

const VOTE: &[u8] = b"vote";
const LAST_PURGED: &[u8] = b"last_purged";
const COMMITTED: &[u8] = b"committed";

/// The Raft log store. Cheap to clone: clones share the same sled trees.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

impl LogStore {
    pub(crate) fn open(db: sled::Db) -> Result<LogStore, StorageError> {
        let log = db.open_tree("log")?;
        let meta = db.open_tree("raft")?;
        Ok(LogStore { db, log, meta })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8], subject: ErrorSubject<u64>) -> RaftResult<Option<T>> {
        let Some(bytes) = self.meta.get(key).map_err(|e| raft_io(subject.clone(), ErrorVerb::Read, e))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| raft_io(subject, ErrorVerb::Read, e))
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T, subject: ErrorSubject<u64>) -> RaftResult<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| raft_io(subject.clone(), ErrorVerb::Write, e))?;
        self.meta.insert(key, bytes).map_err(|e| raft_io(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn flush(&self, subject: ErrorSubject<u64>) -> RaftResult<()> {
        self.db.flush_async().await.map_err(|e| raft_io(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    fn decode(bytes: &[u8]) -> RaftResult<Entry<TypeConfig>> {
        serde_json::from_slice(bytes).map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    fn last_entry_log_id(&self) -> RaftResult<Option<LogId<u64>>> {
        let last = self.log.last().map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        last.map(|(_, v)| Self::decode(&v).map(|e| e.log_id)).transpose()
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> RaftResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let iter = match range.end_bound() {
            Bound::Included(i) => self.log.range(index_key(start)..=index_key(*i)),
            Bound::Excluded(i) => self.log.range(index_key(start)..index_key(*i)),
            Bound::Unbounded => self.log.range(index_key(start)..),
        };
        iter.map(|r| {
            let (_, v) = r.map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            Self::decode(&v)
        })
        .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> RaftResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<u64>> = self.get_meta(LAST_PURGED, ErrorSubject::Store)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> RaftResult<()> {
        self.put_meta(VOTE, vote, ErrorSubject::Vote)?;
        self.flush(ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> RaftResult<Option<Vote<u64>>> {
        self.get_meta(VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> RaftResult<()> {
        // Not flushed on its own: it only shortens recovery, and rides on the next flush.
        self.put_meta(COMMITTED, &committed, ErrorSubject::Store)
    }

    async fn read_committed(&mut self) -> RaftResult<Option<LogId<u64>>> {
        Ok(self.get_meta::<Option<LogId<u64>>>(COMMITTED, ErrorSubject::Store)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> RaftResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry)
                .map_err(|e| raft_io(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, e))?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.log.apply_batch(batch).map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        let flushed = self.db.flush_async().await.map(|_| ()).map_err(std::io::Error::other);
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> RaftResult<()> {
        let mut batch = sled::Batch::default();
        for r in self.log.range(index_key(log_id.index)..) {
            let (k, _) = r.map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.flush(ErrorSubject::Logs).await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> RaftResult<()> {
        // Record the purge point first: a crash between the two steps leaves extra entries,
        // never a gap.
        self.put_meta(LAST_PURGED, &log_id, ErrorSubject::Store)?;
        self.flush(ErrorSubject::Store).await?;
        let mut batch = sled::Batch::default();
        for r in self.log.range(..=index_key(log_id.index)) {
            let (k, _) = r.map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        Ok(())
    }
}
