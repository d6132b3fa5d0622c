//! `promtool check metrics` on a scrape, for the tests that hold a role's `/metrics` to what
//! Prometheus reads. The binary is `$PROMTOOL` or `promtool` on PATH (`.ci/sim-deps.sh`
//! installs it); a missing binary is a panic saying how to get it, never a skip.

use std::io::Write as _;
use std::process::{Command, Stdio};

/// Runs `promtool check metrics` with `text` on stdin: (exit code, stdout and stderr).
pub fn check_metrics(text: &str) -> (i32, String) {
    let bin = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut child = Command::new(&bin)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{bin}` ({e}); install it with `bash .ci/sim-deps.sh` or set PROMTOOL"));
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}
