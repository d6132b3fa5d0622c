//! Backup files (`flotilla snapshot save`): the whole replicated state as one server held it
//! at one store revision, checksummed.
//!
//! Format: the magic `FLOTBAK1`, an 8-byte big-endian length of the header, the header as
//! JSON ([`Header`]: revision, size and SHA-256 of the data, when it was taken, by which
//! server, and the backup [`Header::format`]), then the data: the state machine's snapshot
//! format (a `Store` as JSON). Reading checks the magic, the lengths, the format version (a
//! header without one is version 1; a newer one than [`BACKUP_FORMAT`] is refused, by
//! `flotilla_api::format`'s rule) and the checksum; any mismatch is an error naming it.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"FLOTBAK1";
/// The backup format this binary writes (and the newest it reads).
pub const BACKUP_FORMAT: u32 = 1;

fn unmarked() -> u32 {
    flotilla_api::format::UNMARKED
}

/// Largest header accepted (it is a few hundred bytes).
const MAX_HEADER: u64 = 64 << 10;

/// What a backup says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The store revision the data is at.
    pub revision: u64,
    pub bytes: u64,
    /// Hex SHA-256 of the data.
    pub sha256: String,
    /// Unix ms when it was written.
    pub created_at_ms: u64,
    /// The server that answered.
    pub answered_by: u64,
    /// The version of this file's format (absent in files written before it existed: 1).
    #[serde(default = "unmarked")]
    pub format: u32,
}

/// A backup file read and verified.
#[derive(Debug)]
pub struct Backup {
    pub header: Header,
    pub data: Vec<u8>,
}

/// Why a file is not a usable backup.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackupError {
    #[error("not a flotilla backup (no FLOTBAK1 magic)")]
    NotABackup,
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("header: {0}")]
    Header(String),
    #[error("written in backup format version {found}; this binary reads up to version {supported}: restore it with a newer flotilla")]
    Format { found: u32, supported: u32 },
    #[error("checksum mismatch: the header says sha256 {expected}, the data hashes to {actual}")]
    Checksum { expected: String, actual: String },
}

/// Hex SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> String {
    flotilla_api::hex(&Sha256::digest(data))
}

/// The bytes of a backup file for `data` with `header` (whose `bytes` and `sha256` are
/// filled in here).
pub fn encode(mut header: Header, data: &[u8]) -> Vec<u8> {
    header.bytes = data.len() as u64;
    header.format = BACKUP_FORMAT;
    header.sha256 = sha256(data);
    let h = serde_json::to_vec(&header).unwrap_or_default();
    let mut out = Vec::with_capacity(MAGIC.len() + 8 + h.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(h.len() as u64).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Reads and verifies a backup file's bytes.
pub fn decode(file: &[u8]) -> Result<Backup, BackupError> {
    let rest = file.strip_prefix(MAGIC.as_slice()).ok_or(BackupError::NotABackup)?;
    let (len, rest) = rest.split_at_checked(8).ok_or_else(|| BackupError::Truncated("no header length".into()))?;
    let len = u64::from_be_bytes(len.try_into().unwrap_or_default());
    if len > MAX_HEADER || len > rest.len() as u64 {
        return Err(BackupError::Truncated(format!("header of {len} bytes in a file of {} bytes", file.len())));
    }
    let (h, data) = rest.split_at(len as usize);
    let header: Header = serde_json::from_slice(h).map_err(|e| BackupError::Header(e.to_string()))?;
    if let flotilla_api::format::Decision::TooNew { found } =
        flotilla_api::format::decide(Some(header.format), BACKUP_FORMAT)
    {
        return Err(BackupError::Format { found, supported: BACKUP_FORMAT });
    }
    if header.bytes != data.len() as u64 {
        return Err(BackupError::Truncated(format!("{} data bytes, the header says {}", data.len(), header.bytes)));
    }
    let actual = sha256(data);
    if actual != header.sha256 {
        return Err(BackupError::Checksum { expected: header.sha256, actual });
    }
    Ok(Backup { header, data: data.to_vec() })
}

/// Objects per kind in a backup's data (a `Store` as JSON).
pub fn kinds(data: &[u8]) -> Result<BTreeMap<String, usize>, BackupError> {
    let store: crate::Store = serde_json::from_slice(data).map_err(|e| BackupError::Header(format!("data: {e}")))?;
    let mut out = BTreeMap::new();
    for o in store.objects() {
        *out.entry(o.key.kind.as_str().to_owned()).or_insert(0) += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header { revision: 7, bytes: 0, sha256: String::new(), created_at_ms: 1, answered_by: 2, format: 0 }
    }

    #[test]
    fn round_trips_and_refuses_damage_naming_it() {
        let data = serde_json::to_vec(&crate::Store::new(10)).unwrap();
        let file = encode(header(), &data);
        let b = decode(&file).unwrap();
        assert_eq!((b.header.revision, b.data.clone()), (7, data.clone()));
        assert_eq!(kinds(&b.data).unwrap(), BTreeMap::new());
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(decode(&flipped), Err(BackupError::Checksum { .. })));
        assert_eq!(decode(b"not a backup").unwrap_err(), BackupError::NotABackup);
        assert!(matches!(decode(&file[..file.len() - 1]), Err(BackupError::Truncated(_))));
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(decode(&huge), Err(BackupError::Truncated(_))), "no allocation from a forged length");
        assert_eq!(b.header.format, BACKUP_FORMAT);
    }

    /// The header's bytes replaced by `edit(header JSON)`, lengths fixed up.
    fn with_header(file: &[u8], edit: impl Fn(serde_json::Value) -> serde_json::Value) -> Vec<u8> {
        let len = u64::from_be_bytes(file[8..16].try_into().unwrap()) as usize;
        let h = edit(serde_json::from_slice(&file[16..16 + len]).unwrap());
        let h = serde_json::to_vec(&h).unwrap();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(h.len() as u64).to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&file[16 + len..]);
        out
    }

    #[test]
    fn a_header_without_a_format_is_version_one_and_a_newer_format_is_refused() {
        let data = serde_json::to_vec(&crate::Store::new(10)).unwrap();
        let file = encode(header(), &data);
        let old = with_header(&file, |mut h| {
            h.as_object_mut().unwrap().remove("format");
            h
        });
        assert_eq!(decode(&old).unwrap().header.format, 1, "written before the field existed");
        let newer = with_header(&file, |mut h| {
            h["format"] = (BACKUP_FORMAT + 1).into();
            h
        });
        let e = decode(&newer).unwrap_err();
        assert_eq!(e, BackupError::Format { found: BACKUP_FORMAT + 1, supported: BACKUP_FORMAT });
        assert!(e.to_string().contains("version 2") && e.to_string().contains("up to version 1"), "{e}");
    }
}
