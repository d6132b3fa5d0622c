//! Data dirs private to the user running flotilla (the server's, the agent's): created mode
//! 0700, and an existing one that is group- or world-accessible tightened to 0700 at start,
//! with a warning saying so. Files flotilla writes there itself are 0600 ([`restrict`]); what
//! other libraries create (sled's files) is kept unreachable by the 0700 dir. Modes are set
//! explicitly after creation (`chmod`), so they do not depend on the umask. One copy for the
//! storage and the agent (docs/security.md, "Data on disk").

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Mode of the data dir and of the dirs flotilla creates in it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files flotilla writes in the data dir.
pub const FILE_MODE: u32 = 0o600;

/// The mode a dir found with `mode` must be tightened to, or `None` if it is private
/// already (no group or world bits). Pure.
pub fn tightened(mode: u32) -> Option<u32> {
    (mode & 0o077 != 0).then_some(DIR_MODE)
}

/// Creates `dir` (and missing parents, each 0700) or tightens an existing one to 0700,
/// logging a warning when it was group- or world-accessible. An error names the dir: a
/// data dir that cannot be made private is not used.
pub fn ensure(dir: &Path) -> io::Result<()> {
    let named = |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display()));
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} is not a directory", dir.display())))
        }
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            if let Some(new) = tightened(mode) {
                fs::set_permissions(dir, fs::Permissions::from_mode(new))
                    .map_err(|e| named(e, &format!("cannot tighten data dir (mode {mode:04o}) to {new:04o}:")))?;
                tracing::warn!(
                    dir = %dir.display(),
                    "data dir was mode {mode:04o} (group/world-accessible); tightened to {new:04o}"
                );
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(|e| named(e, "cannot create"))?;
            // Umask-free: the builder's mode is masked by the umask.
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(|e| named(e, "cannot chmod"))?;
        }
        Err(e) => return Err(named(e, "cannot stat")),
    }
    Ok(())
}

/// Sets `file`'s mode to 0600 (whatever the umask made it).
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
        for (found, want) in [
            (0o700, None),
            (0o500, None),
            (0o755, Some(0o700)),
            (0o750, Some(0o700)),
            (0o701, Some(0o700)),
            (0o777, Some(0o700)),
            (0o1777, Some(0o700)),
        ] {
            assert_eq!(tightened(found), want, "{found:o}");
        }
    }

    #[test]
    fn creates_private_and_tightens_an_open_dir() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        ensure(&dir).unwrap();
        assert_eq!((mode(&dir), mode(&root.path().join("a"))), (0o700, 0o700));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ensure(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let file = root.path().join("f");
        fs::write(&file, b"x").unwrap();
        let e = ensure(&file).unwrap_err().to_string();
        assert!(e.contains("is not a directory") && e.contains(&file.display().to_string()), "{e}");
    }
}
