//! The current snapshot on disk: one file, `<dir>/current` (mode 0600), written to a
//! temporary file, fsync'd and renamed into place so a crash leaves either the old or the new
//! snapshot.
//!
//! Format: the magic `FLOTSNP2`, the SHA-256 of everything after it (32 bytes), an 8-byte
//! big-endian length of the metadata, the metadata as JSON, then the data. Loading checks
//! that checksum (it covers the metadata too, which the id's data checksum does not) and the
//! data against the checksum in the snapshot id ([`crate::checksum`]); either mismatch is a
//! [`StorageError::CorruptSnapshot`] naming the file, never a silent load.
//!
//! Files written by earlier versions have no magic and no checksum (length, metadata,
//! data): they still load, flagged as unverified so the caller warns. A flipped byte in the
//! magic cannot pass for that format: the magic has no zero byte, so read as a length it is
//! far larger than any file.
//!
//! Loading reads the file whole and slices it: no allocation follows a length read from it.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use openraft::BasicNode;
use openraft::SnapshotMeta;
use sha2::{Digest, Sha256};

use crate::checksum::{self, Verified};
use crate::StorageError;

pub(crate) type Meta = SnapshotMeta<u64, BasicNode>;

const MAGIC: &[u8; 8] = b"FLOTSNP2";
const SUM: usize = 32;
const HEADER: usize = MAGIC.len() + SUM;

pub(crate) fn current(dir: &Path) -> PathBuf {
    dir.join("current")
}

/// A snapshot read from disk.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) meta: Meta,
    pub(crate) data: Vec<u8>,
    /// Written by an earlier version: neither the file nor (usually) the id has a checksum.
    pub(crate) unverified: bool,
}

/// The file's bytes: magic, checksum, then the body.
fn encode(meta: &Meta, data: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let meta_json = serde_json::to_vec(meta)?;
    let mut body = Vec::with_capacity(8 + meta_json.len() + data.len());
    body.extend_from_slice(&(meta_json.len() as u64).to_be_bytes());
    body.extend_from_slice(&meta_json);
    body.extend_from_slice(data);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses (and verifies) a file's bytes; errors are reasons, without the file name. Pure.
fn decode(mut bytes: Vec<u8>) -> Result<Loaded, String> {
    let (body_at, unverified) = if bytes.starts_with(MAGIC) {
        if bytes.len() < HEADER {
            return Err(format!("truncated: {} bytes, shorter than the {HEADER}-byte header", bytes.len()));
        }
        let actual = Sha256::digest(&bytes[HEADER..]);
        if actual.as_slice() != &bytes[MAGIC.len()..HEADER] {
            return Err(format!(
                "file checksum mismatch: header says sha256 {}, contents hash to {}",
                flotilla_api::hex(&bytes[MAGIC.len()..HEADER]),
                flotilla_api::hex(&actual)
            ));
        }
        (HEADER, false)
    } else {
        (0, true)
    };
    let body = &bytes[body_at..];
    let Some(len) = body.get(..8) else {
        return Err(format!("truncated: {} bytes, no metadata length", bytes.len()));
    };
    let meta_len = u64::from_be_bytes(len.try_into().expect("8 bytes"));
    let rest = body.len() as u64 - 8;
    if meta_len > rest {
        return Err(if unverified {
            "not a snapshot file: no FLOTSNP2 header, and not the older header-less format either".into()
        } else {
            format!("metadata length {meta_len} is beyond the {rest} bytes that follow it")
        });
    }
    let meta_end = body_at + 8 + meta_len as usize;
    let meta: Meta = serde_json::from_slice(&bytes[body_at + 8..meta_end]).map_err(|e| format!("metadata: {e}"))?;
    let data = bytes.split_off(meta_end);
    match checksum::verify(&meta.snapshot_id, &data) {
        Ok(Verified::Matches) => Ok(Loaded { meta, data, unverified }),
        Ok(Verified::Untagged) => Ok(Loaded { meta, data, unverified: true }),
        Err(m) => {
            Err(format!("data checksum mismatch: snapshot id says sha256 {}, data hashes to {}", m.expected, m.actual))
        }
    }
}

pub(crate) fn save(dir: &Path, meta: &Meta, data: &[u8]) -> io::Result<()> {
    flotilla_security::private_dir::ensure(dir)?;
    let bytes = encode(meta, data)?;
    crate::format::write_private(&current(dir), &bytes)
}

/// The current snapshot, if any: verified, or flagged unverified (an earlier version's
/// file). A corrupt file is an error naming it.
pub(crate) fn load(dir: &Path) -> Result<Option<Loaded>, StorageError> {
    let path = current(dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StorageError::Io { path, source }),
    };
    decode(bytes)
        .map(Some)
        .map_err(|reason| StorageError::CorruptSnapshot { snapshot: format!("file {}", path.display()), reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str) -> Meta {
        Meta { snapshot_id: id.into(), ..Default::default() }
    }

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let id = checksum::tagged_id("s1", b"hello");
        save(dir.path(), &meta(&id), b"hello").unwrap();
        let l = load(dir.path()).unwrap().unwrap();
        assert_eq!((l.meta.snapshot_id.as_str(), l.data.as_slice(), l.unverified), (id.as_str(), &b"hello"[..], false));
    }

    #[test]
    fn every_flipped_byte_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let id = checksum::tagged_id("s1", b"{\"a\":1}");
        save(dir.path(), &meta(&id), b"{\"a\":1}").unwrap();
        let good = fs::read(current(dir.path())).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            fs::write(current(dir.path()), &bad).unwrap();
            let e = load(dir.path()).unwrap_err();
            assert_eq!(e.code(), "storage.corrupt_snapshot", "byte {i}: {e}");
            assert!(e.to_string().contains(&current(dir.path()).display().to_string()), "byte {i}: {e}");
        }
        fs::write(current(dir.path()), &good[..good.len() - 1]).unwrap();
        assert!(load(dir.path()).unwrap_err().to_string().contains("checksum mismatch"));
        fs::write(current(dir.path()), &good[..20]).unwrap();
        assert!(load(dir.path()).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn files_of_earlier_versions_load_unverified_and_bad_lengths_are_refused() {
        let legacy = |meta_len: u64, meta: &[u8], data: &[u8]| {
            let mut b = meta_len.to_be_bytes().to_vec();
            b.extend_from_slice(meta);
            b.extend_from_slice(data);
            b
        };
        let m = serde_json::to_vec(&meta("1-5-3")).unwrap();
        let l = decode(legacy(m.len() as u64, &m, b"{}")).unwrap();
        assert_eq!((l.meta.snapshot_id.as_str(), l.data.as_slice(), l.unverified), ("1-5-3", &b"{}"[..], true));
        for bad in [legacy(u64::MAX, &m, b"{}"), legacy(1 << 40, &m, b""), b"FLOT".to_vec(), Vec::new()] {
            assert!(decode(bad).is_err());
        }
        // A legacy file whose id carries a checksum is still checked against it.
        let tagged = serde_json::to_vec(&meta(&checksum::tagged_id("1-5-3", b"{}"))).unwrap();
        assert!(decode(legacy(tagged.len() as u64, &tagged, b"{}")).is_ok());
        assert!(decode(legacy(tagged.len() as u64, &tagged, b"[]")).unwrap_err().contains("data checksum mismatch"));
    }

    #[test]
    fn the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("snapshot");
        save(&dir, &meta("s"), b"x").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&dir), mode(&current(&dir))), (0o700, 0o600));
    }
}
