//! The server data dir's format marker: `<data-dir>/FORMAT`, one line with the version of
//! the layout under it (the sled log, the snapshot file, a pending restore). Opening a data
//! dir checks it with [`flotilla_api::format`]'s rule: no marker is version 1 (dirs written
//! before markers existed) and gets one; a version above [`DATA_DIR_FORMAT`] stops the server
//! with an error naming the dir, the version found and the one supported, before anything in
//! the dir is touched.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use flotilla_api::format::{self, FormatError};

use crate::StorageError;

/// The data dir layout this binary writes (and the newest it reads).
pub const DATA_DIR_FORMAT: u32 = 1;

const FILE: &str = "FORMAT";

/// Checks `dir`'s marker and writes the current one if it is missing or older. `dir` exists.
pub(crate) fn ensure(dir: &Path) -> Result<(), StorageError> {
    let path = dir.join(FILE);
    let found = match fs::read_to_string(&path) {
        Ok(text) => Some(format::parse_marker(&text).ok_or_else(|| FormatError::Unreadable {
            what: "data dir",
            path: dir.display().to_string(),
            marker: text.trim().chars().take(40).collect(),
            supported: DATA_DIR_FORMAT,
        })?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => return Err(StorageError::Io { path, source }),
    };
    format::check("data dir", &dir.display().to_string(), found, DATA_DIR_FORMAT)?;
    if found != Some(DATA_DIR_FORMAT) {
        write_private(&path, format!("{DATA_DIR_FORMAT}\n").as_bytes())
            .map_err(|source| StorageError::Io { path, source })?;
    }
    Ok(())
}

/// Writes `bytes` to `path` (mode 0600) through a temporary file beside it, fsync'd and
/// renamed into place, then fsyncs the directory.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(flotilla_security::private_dir::FILE_MODE)
            .open(&tmp)?;
        flotilla_security::private_dir::restrict(&f)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmarked_dir_gets_the_marker_and_a_newer_one_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join(FILE)).unwrap(), "1\n");
        ensure(dir.path()).unwrap();

        fs::write(dir.path().join(FILE), "2\n").unwrap();
        let e = ensure(dir.path()).unwrap_err();
        assert_eq!(e.code(), "storage.format");
        let msg = e.to_string();
        assert!(msg.contains(&dir.path().display().to_string()) && msg.contains("version 2"), "{msg}");
        assert!(msg.contains("up to version 1"), "{msg}");
        assert_eq!(fs::read_to_string(dir.path().join(FILE)).unwrap(), "2\n", "left as found");

        fs::write(dir.path().join(FILE), "garbage").unwrap();
        assert!(ensure(dir.path()).unwrap_err().to_string().contains("unreadable format marker \"garbage\""));
    }

    #[tokio::test]
    async fn opening_a_data_dir_of_a_newer_format_touches_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(FILE), "3\n").unwrap();
        let e = crate::open(&dir, 10).err().expect("refused");
        assert!(e.to_string().contains("format version 3"), "{e}");
        assert!(!dir.join("db").exists(), "no sled db created");
    }
}
