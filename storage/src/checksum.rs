//! Snapshot checksums (pure). A snapshot's id carries the SHA-256 of its data,
//! `<term>-<index>-<revision>.sha256-<hex>`, so the checksum travels with the snapshot
//! wherever openraft moves it (built here, streamed to a follower in chunks, installed
//! there, read back from disk) without changing the data's format: a follower verifies
//! the data it received against the id before installing it, and a server verifies the
//! file it loads against it. Ids without the suffix were made by earlier versions: their
//! data is accepted unverified (the caller logs a warning).
use sha2::{Digest, Sha256};

const TAG: &str = ".sha256-";

/// SHA-256 of `data`, lower-case hex.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    flotilla_api::hex(&Sha256::digest(data))
}

/// `base` with the checksum of `data` appended.
pub fn tagged_id(base: &str, data: &[u8]) -> String {
    format!("{base}{TAG}{}", sha256_hex(data))
}

/// What [`verify`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verified {
    /// The data matches the id's checksum.
    Matches,
    /// The id carries no checksum (an earlier version made it).
    Untagged,
}

/// The id's checksum and the data's, when they differ.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Mismatch {
    pub(crate) expected: String,
    pub(crate) actual: String,
}

/// Checks `data` against the checksum in snapshot id `id`.
pub(crate) fn verify(id: &str, data: &[u8]) -> Result<Verified, Mismatch> {
    let Some((_, expected)) = id.rsplit_once(TAG) else { return Ok(Verified::Untagged) };
    let actual = sha256_hex(data);
    if actual == expected {
        Ok(Verified::Matches)
    } else {
        Err(Mismatch { expected: expected.to_string(), actual })
    }
}

/// An incremental SHA-256 of snapshot data, for checking it as it arrives in chunks (the
/// Raft service does, before openraft assembles and installs it).
#[derive(Clone, Default)]
pub struct SnapshotDigest(Sha256);

impl SnapshotDigest {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// Checks the data hashed so far against the checksum in snapshot id `id`: `Ok(true)`
    /// when it matches, `Ok(false)` when the id carries none (an earlier version made it),
    /// and an error saying both checksums when it does not match.
    pub fn check(self, id: &str) -> Result<bool, String> {
        let Some((_, expected)) = id.rsplit_once(TAG) else { return Ok(false) };
        let actual = flotilla_api::hex(&self.0.finalize());
        if actual == expected {
            Ok(true)
        } else {
            Err(format!("data checksum mismatch: the id says sha256 {expected}, the data received hashes to {actual}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_data_checksum() {
        let id = tagged_id("3-120-57", b"{}");
        assert_eq!(id, "3-120-57.sha256-44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a");
        let flipped = b"{|";
        let cases: [(&str, &[u8], Result<Verified, ()>); 5] = [
            (&id, b"{}", Ok(Verified::Matches)),
            (&id, flipped, Err(())),
            (&id, b"", Err(())),
            ("3-120-57", b"anything", Ok(Verified::Untagged)),
            ("3-120-57.sha256-", b"{}", Err(())),
        ];
        for (id, data, want) in cases {
            assert_eq!(verify(id, data).map_err(|_| ()), want, "{id} {data:?}");
        }
        let m = verify(&id, flipped).unwrap_err();
        assert_eq!((m.expected.len(), m.actual), (64, sha256_hex(flipped)));
    }

    #[test]
    fn an_incremental_digest_checks_chunks_against_the_id() {
        let id = tagged_id("1-2-3", b"hello world");
        let mut d = SnapshotDigest::default();
        d.update(b"hello ");
        let at_half = d.clone();
        d.update(b"world");
        assert_eq!(d.check(&id), Ok(true));
        let mut wrong = at_half;
        wrong.update(b"w0rld");
        assert!(wrong.check(&id).unwrap_err().contains("mismatch"));
        assert_eq!(SnapshotDigest::default().check("1-2-3"), Ok(false));
    }
}
