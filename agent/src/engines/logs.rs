//! Engine log files: `<data-dir>/logs/<replica>.log`, written by the engine itself
//! (append mode, so it survives agent restarts), rotated by the agent with copy-truncate
//! (`.log` → `.log.1` → ... → `.log.N`, oldest dropped) once it passes a size, and read
//! back for the last line when an engine crashes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Rotation settings for one log file.
#[derive(Debug, Clone)]
pub struct LogFile {
    /// The live file.
    pub path: PathBuf,
    /// Rotate once larger than this.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
}

impl LogFile {
    /// `<dir>/<replica>.log`.
    pub fn new(dir: &Path, replica: &str, max_bytes: u64, keep: u32) -> Self {
        LogFile { path: dir.join(format!("{replica}.log")), max_bytes, keep }
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    /// Rotates when the live file is over the limit. Returns whether it rotated.
    /// Copy-truncate: the engine keeps its file descriptor (opened with O_APPEND), so
    /// after the truncate its writes land at the start of the emptied file.
    pub fn rotate_if_needed(&self) -> std::io::Result<bool> {
        let len = match fs::metadata(&self.path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if len <= self.max_bytes {
            return Ok(false);
        }
        if self.keep == 0 {
            OpenOptions::new().write(true).open(&self.path)?.set_len(0)?;
            return Ok(true);
        }
        let _ = fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        fs::copy(&self.path, self.rotated(1))?;
        OpenOptions::new().write(true).open(&self.path)?.set_len(0)?;
        Ok(true)
    }

    /// The last non-empty line (at most 300 characters), if any.
    pub fn last_line(&self) -> Option<String> {
        let mut f = File::open(&self.path).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf);
        let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
        Some(line.chars().take(300).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn rotates_keeps_n_and_appending_writer_continues() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(dir.path(), "r1", 100, 2);
        let mut w = OpenOptions::new().create(true).append(true).open(&log.path).unwrap();
        for round in 0..4 {
            w.write_all(format!("round {round} {}\n", "x".repeat(120)).as_bytes()).unwrap();
            assert!(log.rotate_if_needed().unwrap());
        }
        assert!(!log.rotate_if_needed().unwrap(), "empty live file is under the limit");
        assert!(log.rotated(1).exists() && log.rotated(2).exists() && !log.rotated(3).exists());
        assert!(fs::read_to_string(log.rotated(1)).unwrap().starts_with("round 3"));
        assert!(fs::read_to_string(log.rotated(2)).unwrap().starts_with("round 2"));
        w.write_all(b"after\n\n").unwrap();
        assert_eq!(fs::read_to_string(&log.path).unwrap(), "after\n\n");
        assert_eq!(log.last_line().as_deref(), Some("after"));
    }
}
