//! The Raft log on sled: entries keyed by big-endian index in tree `log`; the vote, the last
//! purged log id and the committed log id in tree `raft`. Every append and vote is flushed
//! (fsync) before openraft is told it is durable.
//!
//! The newest entries are also kept in memory ([`TailCache`]), so that replication and
//! apply, which read what was just appended, clone them instead of reading and decoding
//! them from sled; sled is read only for older entries (a lagging follower, a restart).
use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

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

/// Most bytes (as encoded; at least one entry) one AppendEntries carries
/// ([`LogStore::limited_get_log_entries`]). openraft 0.9 gives each AppendEntries the
/// heartbeat interval (50 ms by default) to be answered, and retries the same range when it
/// times out; its own bound is 300 entries. A follower that fell thousands of entries behind
/// (the slower one under heavy writes) was sent 300 entries of ~3 KB at a time: serializing,
/// parsing and appending ~1 MB took longer than 50 ms on a loaded machine, every retry
/// timed out again, and when the leader then died the survivors had no quorum for as long as
/// the load lasted (bench/store, failover with 6,400 Models). 128 KiB parse and fsync in a few
/// ms and still move >50 MB/s to a follower at a 2 ms round trip.
pub const MAX_APPEND_BYTES: usize = 128 << 10;

/// Most entries, and most bytes (as encoded), kept in the tail cache.
const CACHE_ENTRIES: usize = 8192;
const CACHE_BYTES: usize = 64 << 20;

/// A copy of the newest log entries: consecutive indexes, always ending at the last entry
/// of the log when not empty (appends, truncations and purges update it with the log).
#[derive(Default)]
struct TailCache {
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl TailCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: Entry<TypeConfig>, size: usize) {
        if let Some((last, _)) = self.entries.back() {
            if last.log_id.index + 1 != entry.log_id.index {
                // Not contiguous (cannot happen: openraft truncates first); start over.
                self.entries.clear();
                self.bytes = 0;
            }
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > CACHE_ENTRIES || (self.bytes > CACHE_BYTES && self.entries.len() > 1) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    /// Drops entries with index >= `index`.
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(e, _)| e.log_id.index >= index) {
            let (_, size) = self.entries.pop_back().expect("checked");
            self.bytes -= size;
        }
    }

    /// Drops entries with index <= `index`.
    fn purge(&mut self, index: u64) {
        while self.first_index().is_some_and(|i| i <= index) {
            self.pop_front();
        }
    }

    /// The entries in `[start, end)`, or `None` if the cache does not start at or before
    /// `start` (the rest of the range is then either cached or not in the log at all).
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        self.get_limited(start, end, usize::MAX)
    }

    /// Like [`TailCache::get`], stopping once the entries taken reach `budget` bytes (at
    /// least one entry).
    fn get_limited(&self, start: u64, end: u64, budget: usize) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let from = (start - first) as usize;
        let to = end.saturating_sub(first).min(self.entries.len() as u64) as usize;
        let mut taken = 0;
        let entries = self.entries.range(from.min(to)..to).take_while(|(_, size)| fits(&mut taken, *size, budget));
        Some(entries.map(|(e, _)| e.clone()).collect())
    }
}

/// Whether one more entry of `size` bytes goes into a batch of `taken` bytes under `budget`
/// (the first always does); counts it when it does.
fn fits(taken: &mut usize, size: usize, budget: usize) -> bool {
    let more = *taken == 0 || taken.saturating_add(size) <= budget;
    if more {
        *taken += size;
    }
    more
}

/// The Raft log store. Cheap to clone: clones share the same sled trees and tail cache.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    cache: Arc<Mutex<TailCache>>,
}

impl LogStore {
    pub(crate) fn open(db: sled::Db) -> Result<LogStore, StorageError> {
        let log = db.open_tree("log")?;
        let meta = db.open_tree("raft")?;
        Ok(LogStore { db, log, meta, cache: Arc::default() })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TailCache> {
        self.cache.lock().expect("log cache lock")
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

impl LogStore {
    /// Empties the log and records it as purged up to `last` (committed there), with
    /// `vote` as the vote; flushed before it returns. Only while openraft is not running:
    /// seeding a restored or forced-new cluster (`crate::seed`), after the snapshot file at
    /// `last` is on disk.
    pub(crate) fn reset_to(&self, last: LogId<u64>, vote: Vote<u64>) -> Result<(), StorageError> {
        self.meta.insert(LAST_PURGED, json(&last))?;
        self.meta.insert(COMMITTED, json(&Some(last)))?;
        self.meta.insert(VOTE, json(&vote))?;
        self.db.flush()?;
        self.log.clear()?;
        self.cache().purge(u64::MAX);
        self.db.flush()?;
        Ok(())
    }
}

/// A value as the `raft` tree holds it (JSON); log ids and votes always serialize.
fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
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
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.cache().get(start, end) {
            return Ok(entries);
        }
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

    /// What replication sends: the entries from `start`, at most [`MAX_APPEND_BYTES`] of
    /// them as encoded (never none when the range is not empty), so each AppendEntries is
    /// answered well within its timeout however far behind the follower is.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> RaftResult<Vec<Entry<TypeConfig>>> {
        if let Some(entries) = self.cache().get_limited(start, end, MAX_APPEND_BYTES) {
            return Ok(entries);
        }
        let mut taken = 0;
        let mut entries = Vec::new();
        for r in self.log.range(index_key(start)..index_key(end)) {
            let (_, v) = r.map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            if !fits(&mut taken, v.len(), MAX_APPEND_BYTES) {
                break;
            }
            entries.push(Self::decode(&v)?);
        }
        Ok(entries)
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
        let mut cached = Vec::new();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry)
                .map_err(|e| raft_io(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, e))?;
            let size = bytes.len();
            batch.insert(&index_key(entry.log_id.index), bytes);
            cached.push((entry, size));
        }
        self.log.apply_batch(batch).map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        {
            let mut cache = self.cache();
            for (entry, size) in cached {
                cache.push(entry, size);
            }
        }
        let flushed = self.db.flush_async().await.map(|_| ()).map_err(std::io::Error::other);
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> RaftResult<()> {
        self.cache().truncate(log_id.index);
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
        self.cache().purge(log_id.index);
        let mut batch = sled::Batch::default();
        for r in self.log.range(..=index_key(log_id.index)) {
            let (k, _) = r.map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(|e| raft_io(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn indexes(entries: Option<Vec<Entry<TypeConfig>>>) -> Option<Vec<u64>> {
        entries.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn tail_cache_follows_appends_truncations_and_purges() {
        let mut c = TailCache::default();
        assert_eq!(indexes(c.get(0, 10)), None);
        for i in 5..10 {
            c.push(entry(i), 10);
        }
        assert_eq!(indexes(c.get(6, 8)), Some(vec![6, 7]));
        assert_eq!(indexes(c.get(8, u64::MAX)), Some(vec![8, 9]));
        assert_eq!(indexes(c.get(12, 20)), Some(vec![]));
        // Older than the cache: the caller reads sled.
        assert_eq!(indexes(c.get(4, 7)), None);
        c.truncate(8);
        assert_eq!(indexes(c.get(5, 100)), Some(vec![5, 6, 7]));
        c.push(entry(8), 10);
        c.purge(6);
        assert_eq!(indexes(c.get(7, 100)), Some(vec![7, 8]));
        assert_eq!(c.bytes, 20);
        // A gap (never produced by openraft) restarts the cache rather than lying.
        c.push(entry(20), 10);
        assert_eq!(indexes(c.get(7, 100)), None);
        assert_eq!(indexes(c.get(20, 100)), Some(vec![20]));
        assert_eq!(c.bytes, 10);
    }

    #[test]
    fn limited_reads_stop_at_the_byte_budget_but_never_return_nothing() {
        let mut c = TailCache::default();
        for i in 0..10 {
            c.push(entry(i), 100);
        }
        assert_eq!(indexes(c.get_limited(2, 10, 350)), Some(vec![2, 3, 4]));
        assert_eq!(indexes(c.get_limited(2, 4, 10_000)), Some(vec![2, 3]));
        // one entry over the budget still goes (alone)
        assert_eq!(indexes(c.get_limited(5, 10, 10)), Some(vec![5]));
        assert_eq!(indexes(c.get_limited(0, 0, 10)), Some(vec![]));
    }

    #[tokio::test]
    async fn replication_reads_from_sled_are_bounded_too() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut store = LogStore::open(db).unwrap();
        let big = |index: u64| Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(crate::Command::Put {
                key: flotilla_api::ObjectKey { kind: flotilla_api::Kind::Tenant, name: "t".parse().unwrap() },
                uid: String::new(),
                labels: Default::default(),
                spec: serde_json::json!({"pad": "x".repeat(40 << 10)}),
                expected_revision: None,
            }),
        };
        // written to sled only (as a restarted server holds them: the cache is empty)
        for i in 1..=10u64 {
            store.log.insert(index_key(i), serde_json::to_vec(&big(i)).unwrap()).unwrap();
        }
        let got = store.limited_get_log_entries(1, 11).await.unwrap();
        let want = MAX_APPEND_BYTES / (40 << 10);
        assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (1..=want as u64).collect::<Vec<_>>());
        assert_eq!(store.try_get_log_entries(1..11).await.unwrap().len(), 10, "apply reads are whole");
    }

    #[test]
    fn tail_cache_is_bounded() {
        let mut c = TailCache::default();
        for i in 0..(CACHE_ENTRIES as u64 + 10) {
            c.push(entry(i), 1);
        }
        assert_eq!(c.entries.len(), CACHE_ENTRIES);
        assert_eq!(c.first_index(), Some(10));
        c.push(entry(CACHE_ENTRIES as u64 + 10), CACHE_BYTES);
        assert_eq!(indexes(c.get(0, u64::MAX)), None);
        assert_eq!(c.entries.len(), 1);
    }
}
