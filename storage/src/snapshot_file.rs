//! The current snapshot on disk: one file, `<dir>/current`, written to a temporary file,
//! fsync'd and renamed into place so a crash leaves either the old or the new snapshot.
//!
//! Format: 8-byte big-endian length of the metadata, the metadata as JSON, then the data.
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use openraft::BasicNode;
use openraft::SnapshotMeta;

pub(crate) type Meta = SnapshotMeta<u64, BasicNode>;

fn current(dir: &Path) -> PathBuf {
    dir.join("current")
}

pub(crate) fn save(dir: &Path, meta: &Meta, data: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let meta_json = serde_json::to_vec(meta)?;
    let tmp = dir.join("current.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&(meta_json.len() as u64).to_be_bytes())?;
        f.write_all(&meta_json)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, current(dir))?;
    File::open(dir)?.sync_all()
}

pub(crate) fn load(dir: &Path) -> io::Result<Option<(Meta, Vec<u8>)>> {
    let mut f = match File::open(current(dir)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let mut meta_json = vec![0u8; u64::from_be_bytes(len) as usize];
    f.read_exact(&mut meta_json)?;
    let meta: Meta = serde_json::from_slice(&meta_json)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok(Some((meta, data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let meta = Meta { snapshot_id: "s1".into(), ..Default::default() };
        save(dir.path(), &meta, b"hello").unwrap();
        let (m, d) = load(dir.path()).unwrap().unwrap();
        assert_eq!((m.snapshot_id.as_str(), d.as_slice()), ("s1", &b"hello"[..]));
    }
}
