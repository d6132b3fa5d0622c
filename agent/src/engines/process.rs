//! OS process plumbing for engines: spawn in a new process group with output appended to
//! the log file, identify a process by pid plus start time (so a reused pid is never
//! mistaken for our engine), check liveness, and stop a whole group (SIGTERM, then SIGKILL
//! after a grace period). Signals go through `rustix`'s safe wrappers; no `unsafe` here.
//!
//! Engines start with exactly the environment their command gives (`env_clear`): see
//! [`crate::engine_env`] for what that is.
//!
//! Engines get their own process group (`process_group(0)`) so that a Ctrl-C aimed at the
//! agent's terminal does not reach them, and so that stopping one also stops whatever it
//! forked (vLLM spawns worker processes).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{kill_process_group, test_kill_process, Pid, Signal};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::driver::EngineCommand;

/// A process as the agent knows it: pid and kernel start time (clock ticks since boot,
/// from `/proc/<pid>/stat`; None where /proc is unavailable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// Process id, also the process group id.
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start_ticks: Option<u64>,
}

impl ProcessIdentity {
    /// Identity of a live pid.
    pub fn of(pid: u32) -> Self {
        ProcessIdentity { pid, start_ticks: start_ticks(pid) }
    }

    /// True while this very process is alive (not a zombie, not a reused pid).
    pub fn is_alive(&self) -> bool {
        let Some(pid) = Pid::from_raw(self.pid as i32) else { return false };
        if test_kill_process(pid).is_err() {
            return false;
        }
        match (stat(self.pid), self.start_ticks) {
            (Some((state, _)), _) if state == 'Z' || state == 'X' => false,
            (Some((_, now)), Some(then)) => now == then,
            (None, Some(_)) => false,
            (_, None) => true,
        }
    }

    /// Sends `sig` to the process group.
    pub fn signal_group(&self, sig: Signal) {
        if let Some(pid) = Pid::from_raw(self.pid as i32) {
            if let Err(e) = kill_process_group(pid, sig) {
                tracing::debug!(pid = self.pid, error = %e, "signal to engine process group failed");
            }
        }
    }

    /// SIGTERM to the group, wait up to `grace` for the leader to go, then SIGKILL the
    /// group. Returns true if it had to kill.
    pub async fn stop(&self, grace: Duration) -> bool {
        if !self.is_alive() {
            // The leader is gone; its group may still hold forked workers.
            self.signal_group(Signal::KILL);
            return false;
        }
        self.signal_group(Signal::TERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.is_alive() {
                self.signal_group(Signal::KILL);
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!(
            pid = self.pid,
            grace_ms = grace.as_millis() as u64,
            "engine ignored SIGTERM; killing its process group"
        );
        self.signal_group(Signal::KILL);
        true
    }
}

/// `(state, starttime)` from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // starttime is field 22 overall; after ')' we are at field 3.
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

fn start_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, t)| t)
}

/// Spawns `cmd` in a new process group with `cmd.env` as its whole environment, stdout and
/// stderr appended to `log` (the file is the engine's, not a pipe to the agent: engines
/// keep logging after the agent exits).
pub fn spawn(cmd: &EngineCommand, log: &Path) -> std::io::Result<(Child, ProcessIdentity)> {
    let mut file =
        OpenOptions::new().create(true).append(true).mode(flotilla_security::private_dir::FILE_MODE).open(log)?;
    flotilla_security::private_dir::restrict(&file)?;
    writeln!(file, "--- flotilla agent: starting: {}", cmd.display())?;
    let err = file.try_clone()?;
    let mut command = Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(false);
    let child = command.spawn()?;
    let pid = child.id().ok_or_else(|| std::io::Error::other("spawned process has no pid"))?;
    Ok((child, ProcessIdentity::of(pid)))
}

/// "exit status 1", "killed by signal 9".
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawn_identify_and_stop_a_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let cmd = EngineCommand {
            program: "sh".into(),
            args: vec!["-c".into(), "echo hello $HOME$ONLY; sleep 30 & wait".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into()), ("ONLY".into(), "this".into())],
        };
        let (mut child, id) = spawn(&cmd, &log).unwrap();
        assert!(id.is_alive());
        assert!(id.start_ticks.is_some());
        let other = ProcessIdentity { start_ticks: id.start_ticks.map(|t| t + 1), ..id };
        assert!(!other.is_alive(), "a different start time is a different process");
        // The shell has written its line before it is stopped.
        for _ in 0..500 {
            if std::fs::read_to_string(&log).unwrap_or_default().contains("\nhello") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let killed = id.stop(Duration::from_secs(5)).await;
        assert!(!killed);
        let status = child.wait().await.unwrap();
        assert!(describe_exit(status).contains("signal 15"), "{}", describe_exit(status));
        assert!(!id.is_alive());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("starting: sh -c"), "{text}");
        assert!(text.contains("\nhello this\n"), "only cmd.env reaches the process (not our HOME): {text}");
    }
}
