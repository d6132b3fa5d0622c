//! The Python interpreter tests run scripts with (the `openai` SDK checks, moto for S3):
//! `FLOTILLA_PYTHON` if set, else the repository's venv `<repo>/.venv/bin/python`, which
//! `.ci/sim-deps.sh` and `agent/tests/s3-deps.sh` create.

use std::path::{Path, PathBuf};

/// Where the interpreter is; it may not exist.
pub fn python() -> PathBuf {
    choose(std::env::var_os("FLOTILLA_PYTHON").map(PathBuf::from), Path::new(env!("CARGO_MANIFEST_DIR")))
}

/// `FLOTILLA_PYTHON` if given, else the venv at the root of the workspace holding `crate_dir`.
fn choose(from_env: Option<PathBuf>, crate_dir: &Path) -> PathBuf {
    from_env.unwrap_or_else(|| crate_dir.join("../.venv/bin/python"))
}

/// [`python`], or a failure saying how to get one.
pub fn require_python() -> PathBuf {
    let py = python();
    assert!(
        py.exists(),
        "no Python interpreter at {} (set FLOTILLA_PYTHON, or run `bash .ci/sim-deps.sh` to create the venv with openai)",
        py.display()
    );
    py
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_env_wins_over_the_venv() {
        let table: &[(Option<&str>, &str)] =
            &[(Some("/usr/bin/python3"), "/usr/bin/python3"), (None, "/repo/testkit/../.venv/bin/python")];
        for (env, want) in table {
            assert_eq!(choose(env.map(PathBuf::from), Path::new("/repo/testkit")), PathBuf::from(want), "{env:?}");
        }
    }
}
