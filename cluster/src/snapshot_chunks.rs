//! Bounds on incoming InstallSnapshot chunks, checked before openraft sees them (pure).
//!
//! openraft 0.9 writes each chunk into the snapshot buffer at the chunk's `offset`, seeking
//! there first: a forged chunk with a huge offset would make it allocate that much. So a
//! chunk is admitted only when
//! - `offset + len` stays within the bound (`--max-snapshot-bytes`, default 4 GiB); else
//!   [`Refusal::TooLarge`] (answered INVALID_ARGUMENT), and
//! - its offset is 0 (a stream starts or restarts) or the next offset of the stream under
//!   way for the same snapshot id, or the previous chunk's offset (the leader resends a
//!   chunk whose answer it lost); else [`Refusal::OutOfSequence`] (answered with openraft's
//!   `SnapshotMismatch`, on which a real leader restarts the transfer at offset 0).
//!
//! The buffer so never grows past what the stream really sent. The guard also hashes the
//! chunks as they arrive; on the last one (`done`) the hash must match the checksum in the
//! snapshot id ([`flotilla_storage::SnapshotDigest`]), else [`Refusal::Corrupt`] (answered
//! `SnapshotMismatch` too: the leader sends the snapshot again rather than this server
//! installing damaged data or the state machine failing on it).
use flotilla_storage::SnapshotDigest;

/// Default bound on a received snapshot's size, bytes.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: u64 = 4 << 30;

/// The stream under way.
struct Stream {
    id: String,
    /// Offset of the last admitted chunk.
    last_offset: u64,
    /// Where the next chunk must start.
    next: u64,
    /// The hash of the data before the last chunk (to redo it when the chunk is resent).
    before_last: SnapshotDigest,
    digest: SnapshotDigest,
}

/// The chunk guard of one server.
pub(crate) struct ChunkGuard {
    max: u64,
    stream: Option<Stream>,
}

/// Why a chunk is refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `offset + len` exceeds the bound (or overflows).
    TooLarge { offset: u64, len: u64, max: u64 },
    /// Not where the stream is: the chunk expected is at `expect`.
    OutOfSequence { expect: u64 },
    /// The last chunk arrived but the data does not match the id's checksum.
    Corrupt(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TooLarge { offset, len, max } => write!(
                f,
                "cluster.snapshot_too_large: a chunk of {len} bytes at offset {offset} ends beyond the {max}-byte \
                 bound on snapshots (--max-snapshot-bytes)"
            ),
            Refusal::OutOfSequence { expect } => write!(f, "snapshot chunk out of sequence: expected offset {expect}"),
            Refusal::Corrupt(reason) => write!(f, "snapshot refused: {reason}"),
        }
    }
}

impl ChunkGuard {
    pub(crate) fn new(max: u64) -> ChunkGuard {
        ChunkGuard { max, stream: None }
    }

    /// Admits a chunk (and advances the stream) or refuses it (the stream unchanged, except
    /// that a corrupt snapshot ends it).
    pub(crate) fn admit(&mut self, id: &str, offset: u64, data: &[u8], done: bool) -> Result<(), Refusal> {
        let len = data.len() as u64;
        let end = offset.checked_add(len).filter(|end| *end <= self.max);
        let Some(end) = end else { return Err(Refusal::TooLarge { offset, len, max: self.max }) };
        let mut stream = match self.stream.take() {
            _ if offset == 0 => Stream {
                id: id.to_owned(),
                last_offset: 0,
                next: 0,
                before_last: Default::default(),
                digest: Default::default(),
            },
            Some(s) if s.id == id && (offset == s.next || offset == s.last_offset) => s,
            other => {
                let expect = other.as_ref().filter(|s| s.id == id).map_or(0, |s| s.next);
                self.stream = other;
                return Err(Refusal::OutOfSequence { expect });
            }
        };
        if offset == stream.next {
            stream.before_last = stream.digest.clone();
        } else {
            // A resent last chunk: hash it again from where it started.
            stream.digest = stream.before_last.clone();
        }
        stream.digest.update(data);
        stream.last_offset = offset;
        stream.next = end;
        if done {
            // The stream ends here either way; a corrupt one is refused.
            return match stream.digest.check(id) {
                Ok(_) => Ok(()),
                Err(reason) => Err(Refusal::Corrupt(reason)),
            };
        }
        self.stream = Some(stream);
        Ok(())
    }

    /// Forgets the stream (openraft refused a chunk the guard admitted: the two must not
    /// disagree on where it is).
    pub(crate) fn reset(&mut self) {
        self.stream = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_for(data: &[u8]) -> String {
        flotilla_storage::snapshot_id_with_checksum("1-9-9", data)
    }

    #[test]
    fn chunks_in_sequence_resends_and_restarts_are_admitted_and_the_rest_refused() {
        let data = b"0123456789abcdef";
        let id = id_for(data);
        let max = 100;
        // (offset, bytes, done, expected)
        type Step<'a> = (u64, &'a [u8], bool, Result<(), Refusal>);
        let steps: Vec<Step> = vec![
            (4, &data[4..8], false, Err(Refusal::OutOfSequence { expect: 0 })),
            (0, &data[..4], false, Ok(())),
            (8, &data[8..12], false, Err(Refusal::OutOfSequence { expect: 4 })),
            (4, &data[4..8], false, Ok(())),
            (4, &data[4..8], false, Ok(())), // resent: its answer was lost
            (1 << 40, b"x", false, Err(Refusal::TooLarge { offset: 1 << 40, len: 1, max })),
            (u64::MAX, b"x", false, Err(Refusal::TooLarge { offset: u64::MAX, len: 1, max })),
            (96, &[0u8; 8], false, Err(Refusal::TooLarge { offset: 96, len: 8, max })),
            (8, &data[8..], true, Ok(())),
            (8, &data[8..], true, Err(Refusal::OutOfSequence { expect: 0 })), // the stream ended
        ];
        let mut g = ChunkGuard::new(max);
        for (i, (offset, bytes, done, want)) in steps.into_iter().enumerate() {
            assert_eq!(g.admit(&id, offset, bytes, done), want, "step {i}");
        }
    }

    #[test]
    fn a_stream_of_another_id_or_damaged_data_is_refused() {
        let data = b"snapshot data";
        let id = id_for(data);
        let mut g = ChunkGuard::new(1 << 20);
        assert_eq!(g.admit(&id, 0, &data[..4], false), Ok(()));
        assert_eq!(g.admit("other", 4, &data[4..], true), Err(Refusal::OutOfSequence { expect: 0 }));
        let mut bad = data[4..].to_vec();
        bad[0] ^= 1;
        let r = g.admit(&id, 4, &bad, true);
        assert!(matches!(&r, Err(Refusal::Corrupt(m)) if m.contains("checksum mismatch")), "{r:?}");
        assert_eq!(
            g.admit(&id, 4, &data[4..], true),
            Err(Refusal::OutOfSequence { expect: 0 }),
            "a corrupt stream ends"
        );
        // Sent again from the start, it is admitted; an id without a checksum is not checked.
        assert_eq!(g.admit(&id, 0, &data[..4], false), Ok(()));
        assert_eq!(g.admit(&id, 4, &data[4..], true), Ok(()));
        assert_eq!(g.admit("1-2-3", 0, b"anything", true), Ok(()));
        // A reset guard (openraft refused a chunk) waits for a new stream.
        assert_eq!(g.admit(&id, 0, &data[..4], false), Ok(()));
        g.reset();
        assert_eq!(g.admit(&id, 4, &data[4..], true), Err(Refusal::OutOfSequence { expect: 0 }));
        let e = Refusal::TooLarge { offset: 1 << 40, len: 3, max: 4 << 30 }.to_string();
        assert!(e.contains("1099511627776") && e.contains("--max-snapshot-bytes"), "{e}");
    }
}
