//! The agent's data dir is private to the user running it: created mode 0700 (its `logs`
//! and `models` dirs too), and an existing one that is group- or world-accessible is
//! tightened to 0700 at start, with a warning saying so. Files the agent writes there
//! itself (`agent-id`, `engines.json`, `agent.lock`, download markers, engine logs) are 0600.
//! Modes are set explicitly after creation, so they do not depend on the umask.
//!
//! The same rules as the server's data dir (`flotilla-storage`'s `private_dir`); the agent
//! does not depend on the storage crate, hence this small twin.
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::AgentError;

/// Mode of the data dir and the dirs the agent creates in it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files the agent writes in the data dir.
pub const FILE_MODE: u32 = 0o600;

/// The mode a dir found with `mode` must be tightened to, or `None` if it has no group or
/// world bits. Pure.
pub fn tightened(mode: u32) -> Option<u32> {
    (mode & 0o077 != 0).then_some(DIR_MODE)
}

/// Creates `dir` (missing parents too, each 0700) or tightens an existing one to 0700,
/// logging a warning when it was group- or world-accessible. An error names the dir.
pub fn ensure(dir: &Path) -> Result<(), AgentError> {
    let err = |e: io::Error| AgentError::io(dir, e);
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(err(io::Error::new(io::ErrorKind::AlreadyExists, "not a directory"))),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            if let Some(new) = tightened(mode) {
                fs::set_permissions(dir, fs::Permissions::from_mode(new)).map_err(|e| {
                    err(io::Error::new(e.kind(), format!("cannot tighten mode {mode:04o} to {new:04o}: {e}")))
                })?;
                tracing::warn!(
                    dir = %dir.display(),
                    "agent data dir was mode {mode:04o} (group/world-accessible); tightened to {new:04o}"
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(err)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Sets an open file's mode to 0600, whatever the umask made it.
pub fn restrict(file: &fs::File) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn only_group_or_world_bits_need_tightening() {
        for (found, want) in
            [(0o700, None), (0o500, None), (0o755, Some(0o700)), (0o710, Some(0o700)), (0o777, Some(0o700))]
        {
            assert_eq!(tightened(found), want, "{found:o}");
        }
    }

    #[test]
    fn creates_private_tightens_an_open_dir_and_names_a_file_in_the_way() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        ensure(&dir).unwrap();
        assert_eq!((mode(&dir), mode(&root.path().join("a"))), (0o700, 0o700));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o775)).unwrap();
        ensure(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let file = root.path().join("f");
        fs::write(&file, b"x").unwrap();
        let e = ensure(&file).unwrap_err().to_string();
        assert!(e.contains("not a directory") && e.contains(&file.display().to_string()), "{e}");
    }
}
