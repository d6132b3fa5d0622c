//! `file://` sources: the node-local (or shared-filesystem) file or directory is brought
//! into the cache like any other source, so engines always read from the node's cache
//! disk. Each file is hard-linked when the source is on the cache's filesystem (instant,
//! no extra space) and copied otherwise (an NFS mount to local NVMe: the usual reason to
//! cache). A [`stamp`] of the source (files, bytes, newest mtime) is kept in the cache
//! marker, so a source changed in place is brought in again rather than served stale.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// One regular file under a local source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    /// Absolute path of the source file.
    pub path: PathBuf,
    /// Path relative to the source root (the file name for a single-file source).
    pub rel: PathBuf,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch (0 when unknown).
    pub mtime_ns: u128,
}

/// The files of a local source (sorted by relative path) and whether it is a single file.
/// Symbolic links are followed; anything that is neither file nor directory is skipped.
pub async fn list(root: &Path) -> Result<(Vec<LocalFile>, bool), String> {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || list_blocking(&root)).await.map_err(|e| e.to_string())?
}

fn list_blocking(root: &Path) -> Result<(Vec<LocalFile>, bool), String> {
    let meta = std::fs::metadata(root).map_err(|e| format!("file://{}: {e}", root.display()))?;
    let entry = |path: PathBuf, rel: PathBuf, m: &std::fs::Metadata| LocalFile {
        path,
        rel,
        size: m.len(),
        mtime_ns: m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos()),
    };
    if meta.is_file() {
        let name = root.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("model"));
        return Ok((vec![entry(root.to_path_buf(), name, &meta)], true));
    }
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel_dir) = dirs.pop() {
        let dir = root.join(&rel_dir);
        let rd = std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for item in rd {
            let item = item.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let rel = rel_dir.join(item.file_name());
            let m = std::fs::metadata(item.path()).map_err(|e| format!("{}: {e}", item.path().display()))?;
            if m.is_dir() {
                dirs.push(rel);
            } else if m.is_file() {
                out.push(entry(item.path(), rel, &m));
            }
        }
    }
    if out.is_empty() {
        return Err(format!("file://{}: the directory holds no files", root.display()));
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((out, false))
}

/// What identifies a source's content cheaply: file count, total bytes, newest mtime.
pub fn stamp(files: &[LocalFile]) -> String {
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    let newest = files.iter().map(|f| f.mtime_ns).max().unwrap_or(0);
    format!("files={} bytes={bytes} mtime_ns={newest}", files.len())
}

/// Bytes that placing `files` in the cache under `cache` takes on the cache's disk: none
/// for files on the same filesystem (hard-linked), their size for the others (copied).
pub async fn bytes_to_copy(files: &[LocalFile], cache: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(cache_dev) = tokio::fs::metadata(cache).await.map(|m| m.dev()) else {
        return files.iter().map(|f| f.size).sum();
    };
    let mut n = 0;
    for f in files {
        match tokio::fs::metadata(&f.path).await {
            Ok(m) if m.dev() == cache_dev => {}
            _ => n += f.size,
        }
    }
    n
}

/// Puts `src` at `dest`: a hard link when possible, else a copy. Returns the bytes placed.
pub async fn place(src: &Path, dest: &Path) -> Result<u64, String> {
    let _ = tokio::fs::remove_file(dest).await;
    if tokio::fs::hard_link(src, dest).await.is_ok() {
        return tokio::fs::metadata(dest).await.map(|m| m.len()).map_err(|e| format!("{}: {e}", dest.display()));
    }
    tokio::fs::copy(src, dest).await.map_err(|e| format!("cannot copy {} to {}: {e}", src.display(), dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lists_a_tree_and_a_single_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m/sub")).unwrap();
        std::fs::write(d.path().join("m/config.json"), b"{}").unwrap();
        std::fs::write(d.path().join("m/sub/w.bin"), b"12345").unwrap();
        let (files, single) = list(&d.path().join("m")).await.unwrap();
        assert!(!single);
        let rels: Vec<_> = files.iter().map(|f| f.rel.display().to_string()).collect();
        assert_eq!(rels, ["config.json", "sub/w.bin"]);
        assert!(stamp(&files).starts_with("files=2 bytes=7 "), "{}", stamp(&files));
        let (one, single) = list(&d.path().join("m/sub/w.bin")).await.unwrap();
        assert!(single);
        assert_eq!(one[0].rel, PathBuf::from("w.bin"));
        std::fs::create_dir_all(d.path().join("empty")).unwrap();
        assert!(list(&d.path().join("empty")).await.unwrap_err().contains("holds no files"));
        assert!(list(&d.path().join("nope")).await.is_err());
    }

    #[tokio::test]
    async fn place_links_or_copies() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"abc").unwrap();
        assert_eq!(place(&d.path().join("a"), &d.path().join("b")).await.unwrap(), 3);
        assert_eq!(std::fs::read(d.path().join("b")).unwrap(), b"abc");
        let (files, _) = list(&d.path().join("a")).await.unwrap();
        assert_eq!(bytes_to_copy(&files, d.path()).await, 0, "same filesystem: linked, no space taken");
        assert_eq!(bytes_to_copy(&files, &d.path().join("missing")).await, 3);
    }
}
