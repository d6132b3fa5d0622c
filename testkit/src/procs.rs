//! Processes a test or a run starts: signals to a process or its whole group, a child in
//! its own process group that is stopped (group SIGTERM, then SIGKILL) on drop, and the
//! tail of a log for failure messages.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

pub use rustix::process::Signal;
use rustix::process::{kill_process, kill_process_group, Pid};

/// Sends `sig` to process `pid`; true if it was delivered.
pub fn signal(pid: u32, sig: Signal) -> bool {
    Pid::from_raw(pid as i32).is_some_and(|p| kill_process(p, sig).is_ok())
}

/// Sends `sig` to every process of group `pgid`; true if it was delivered.
pub fn signal_group(pgid: u32, sig: Signal) -> bool {
    Pid::from_raw(pgid as i32).is_some_and(|p| kill_process_group(p, sig).is_ok())
}

/// SIGKILLs `child` (after SIGCONT, so a paused one dies too) and reaps it.
pub fn kill_and_reap(child: &mut Child) {
    signal(child.id(), Signal::CONT);
    let _ = child.kill();
    let _ = child.wait();
}

/// A child in its own process group; the whole group is stopped on drop.
#[derive(Debug)]
pub struct Group {
    child: Option<Child>,
}

impl Group {
    /// Spawns `cmd` in a new process group, stdin closed, stdout and stderr to a new file at
    /// `log`. Panics naming `name` if it cannot start.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Group {
        use std::os::unix::process::CommandExt as _;
        let file = std::fs::File::create(log).expect("create log");
        let err = file.try_clone().expect("clone log");
        cmd.stdin(Stdio::null()).stdout(file).stderr(err).process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Group { child: Some(child) }
    }

    /// The leader's pid (also the group's id); 0 once stopped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM to the group (after SIGCONT); SIGKILL after `grace`. Returns how long the
    /// leader took to go.
    pub fn stop(&mut self, grace: Duration) -> Duration {
        let t0 = Instant::now();
        let Some(mut child) = self.child.take() else { return Duration::ZERO };
        let pgid = child.id();
        signal_group(pgid, Signal::CONT);
        signal_group(pgid, Signal::TERM);
        while t0.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            #[allow(clippy::disallowed_methods)] // a synchronous teardown path
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = t0.elapsed();
        signal_group(pgid, Signal::KILL);
        let _ = child.kill();
        let _ = child.wait();
        took
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The last `n` lines of the file at `path` (empty if unreadable), for failure messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    last_lines(&std::fs::read_to_string(path).unwrap_or_default(), n)
}

/// The last `n` lines of `text`, joined by newlines.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keeps_the_end() {
        let table: &[(&str, usize, &str)] = &[
            ("a\nb\nc\n", 2, "b\nc"),
            ("a\nb\nc", 5, "a\nb\nc"),
            ("a\nb\nc", 0, ""),
            ("", 3, ""),
            ("one line", 1, "one line"),
            ("a\r\nb\r\n", 1, "b"),
        ];
        for (text, n, want) in table {
            assert_eq!(last_lines(text, *n), *want, "{text:?} {n}");
        }
    }

    #[test]
    fn a_missing_log_has_an_empty_tail() {
        assert_eq!(log_tail(Path::new("/nonexistent/flotilla.log"), 10), "");
    }

    #[test]
    fn a_group_is_stopped_with_its_children() {
        let dir = tempdir();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 60 & sleep 60"]);
        let mut g = Group::spawn("sh", cmd, &dir.join("sh.log"));
        let pgid = g.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while crate::proc_fs::group_members(pgid).len() < 2 {
            assert!(Instant::now() < deadline, "the group never had two members");
            #[allow(clippy::disallowed_methods)] // a plain synchronous test
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(g.stop(Duration::from_secs(5)) < Duration::from_secs(5), "sh ignored SIGTERM");
        assert_eq!(g.pid(), 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !crate::proc_fs::group_members(pgid).is_empty() {
            assert!(Instant::now() < deadline, "group members left: {:?}", crate::proc_fs::group_members(pgid));
            #[allow(clippy::disallowed_methods)] // a plain synchronous test
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn signals_to_no_process_are_not_delivered() {
        // pid 0 is not a process id rustix accepts; a huge one does not exist.
        assert!(!signal(0, Signal::CONT));
        assert!(!signal(i32::MAX as u32, Signal::CONT));
        assert!(!signal_group(i32::MAX as u32, Signal::CONT));
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("flotilla-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}
