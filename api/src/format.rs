//! Versions of on-disk formats (the server's data dir, the agent's state file, backup files)
//! and the one rule every reader applies to them: a missing marker is version 1 (the
//! format written before markers existed), a version up to the one this binary supports is
//! read (and the marker brought up to date by the caller), a newer one is refused with an
//! error naming the file, the version found and the newest this binary knows. Pure: callers
//! read and write the markers.

/// What a reader does with a format marker it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The marker says `supported`: read as is.
    Current,
    /// No marker, or an older version this binary still reads: read it, and write the
    /// marker for `supported` once it is rewritten in the current format.
    Upgrade { from: u32 },
    /// Written by a newer binary: refuse.
    TooNew { found: u32 },
}

/// A format newer than this binary knows (or a marker that is not a version at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{what} {path} has format version {found}; this binary supports up to version {supported}: run a newer flotilla (or restore a backup taken by this version)")]
    TooNew { what: &'static str, path: String, found: u32, supported: u32 },
    #[error("{what} {path} has an unreadable format marker {marker:?} (want a positive integer; supported up to version {supported})")]
    Unreadable { what: &'static str, path: String, marker: String, supported: u32 },
}

/// The version a missing marker stands for.
pub const UNMARKED: u32 = 1;

/// What to do with a marker `found` (None: absent) for a reader that supports up to
/// `supported`.
pub fn decide(found: Option<u32>, supported: u32) -> Decision {
    match found.unwrap_or(UNMARKED) {
        v if v == supported => Decision::Current,
        v if v > supported => Decision::TooNew { found: v },
        v => Decision::Upgrade { from: v },
    }
}

/// Parses a text marker (`"1\n"`), as the data dir's `FORMAT` file holds it.
pub fn parse_marker(text: &str) -> Option<u32> {
    text.trim().parse().ok().filter(|v| *v > 0)
}

/// [`decide`] as a result: `Ok` with the version found (1 when unmarked), or the error
/// naming `what` at `path`.
pub fn check(what: &'static str, path: &str, found: Option<u32>, supported: u32) -> Result<u32, FormatError> {
    match decide(found, supported) {
        Decision::Current => Ok(supported),
        Decision::Upgrade { from } => Ok(from),
        Decision::TooNew { found } => Err(FormatError::TooNew { what, path: path.into(), found, supported }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmarked_is_version_one_older_is_read_newer_is_refused() {
        // (found, supported, decision)
        let table = [
            (None, 1, Decision::Current),
            (Some(1), 1, Decision::Current),
            (None, 2, Decision::Upgrade { from: 1 }),
            (Some(1), 3, Decision::Upgrade { from: 1 }),
            (Some(2), 3, Decision::Upgrade { from: 2 }),
            (Some(3), 3, Decision::Current),
            (Some(2), 1, Decision::TooNew { found: 2 }),
            (Some(9), 2, Decision::TooNew { found: 9 }),
        ];
        for (i, (found, supported, want)) in table.into_iter().enumerate() {
            assert_eq!(decide(found, supported), want, "row {i}");
        }
        let e = check("data dir", "/var/lib/x", Some(7), 1).unwrap_err().to_string();
        assert!(e.contains("/var/lib/x") && e.contains("version 7") && e.contains("up to version 1"), "{e}");
        assert_eq!(check("data dir", "/x", None, 2), Ok(1));
        assert_eq!(check("data dir", "/x", Some(2), 2), Ok(2));
    }

    #[test]
    fn markers_parse_as_positive_integers() {
        assert_eq!(parse_marker("1\n"), Some(1));
        assert_eq!(parse_marker(" 12 "), Some(12));
        for bad in ["", "0", "-1", "v2", "1.5"] {
            assert_eq!(parse_marker(bad), None, "{bad:?}");
        }
    }
}
