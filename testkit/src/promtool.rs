//! `promtool` for tests: `check metrics` on a scrape (the tests that hold a role's
//! `/metrics` to what Prometheus reads) and any other subcommand on files ([`run`]). The binary is `$PROMTOOL` or `promtool` on PATH (`.ci/sim-deps.sh`
//! installs it); a missing binary is a panic saying how to get it, never a skip.

use std::io::Write as _;
use std::process::{Command, Stdio};

/// Starts `promtool ARGS` in `dir` with `stdin` given, stdout and stderr captured.
fn spawn(args: &[&str], dir: Option<&std::path::Path>, stdin: Stdio) -> std::process::Child {
    let bin = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut cmd = Command::new(&bin);
    cmd.args(args).stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot run `{bin}` ({e}); install it with `bash .ci/sim-deps.sh` or set PROMTOOL"))
}

/// (exit code, stdout and stderr) of a finished promtool.
fn finish(child: std::process::Child) -> (i32, String) {
    let out = child.wait_with_output().expect("promtool ran");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Runs `promtool check metrics` with `text` on stdin: (exit code, stdout and stderr).
pub fn check_metrics(text: &str) -> (i32, String) {
    let mut child = spawn(&["check", "metrics"], None, Stdio::piped());
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
    finish(child)
}

/// Runs `promtool ARGS` in `dir` (`check rules F`, `test rules F`, `check config F`):
/// (exit code, stdout and stderr).
pub fn run(args: &[&str], dir: &std::path::Path) -> (i32, String) {
    finish(spawn(args, Some(dir), Stdio::null()))
}
