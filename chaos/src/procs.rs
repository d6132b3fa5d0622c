//! The processes of a run: each is a `flotilla` child with its command line kept so it can
//! be restarted as it was, output appended to `<run-dir>/<name>.log`, and the environment
//! variable `FLOTILLA_CHAOS_RUN=<run id>` so that [`cleanup`] can find everything a run
//! started — including sim engines, which agents start in their own process groups and
//! which outlive a killed agent by design — even after the harness itself was killed.
//! Signals, `/proc` scans, free ports and log tails are the shared `flotilla_testkit` ones.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use flotilla_testkit::proc_fs;
use flotilla_testkit::procs::{signal, signal_group, Signal};
use tokio::process::{Child, Command};

/// The environment variable that marks a run's processes.
pub const RUN_ENV: &str = "FLOTILLA_CHAOS_RUN";

/// How a process is (re)started.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

/// One process of the run.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub launch: Launch,
    child: Option<Child>,
    paused: bool,
    pub starts: u32,
}

/// What a process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Paused,
    Down,
}

impl Proc {
    pub fn new(name: &str, launch: Launch) -> Proc {
        Proc { name: name.to_string(), launch, child: None, paused: false, starts: 0 }
    }

    /// Starts (or restarts) the process.
    pub fn start(&mut self, run_id: &str) -> std::io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new().create(true).append(true).open(&self.launch.log)?;
        let err = log.try_clone()?;
        let mut cmd = Command::new(&self.launch.program);
        cmd.args(&self.launch.args)
            .envs(self.launch.env.iter().map(|(k, v)| (k, v)))
            .env(RUN_ENV, run_id)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true);
        self.child = Some(cmd.spawn()?);
        self.paused = false;
        self.starts += 1;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn state(&mut self) -> State {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) if self.paused => State::Paused,
            Some(Ok(None)) => State::Running,
            _ => State::Down,
        }
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            signal(pid, sig);
        }
    }

    /// SIGKILL (after SIGCONT, so a paused process dies too) and reap.
    pub async fn kill(&mut self) {
        self.signal(Signal::CONT);
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        }
        self.paused = false;
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn terminate(&mut self, grace: Duration) {
        self.signal(Signal::CONT);
        self.signal(Signal::TERM);
        if let Some(c) = self.child.as_mut() {
            if tokio::time::timeout(grace, c.wait()).await.is_ok() {
                self.child = None;
            }
        }
        self.kill().await;
    }

    pub fn pause(&mut self) {
        self.signal(Signal::STOP);
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.signal(Signal::CONT);
        self.paused = false;
    }
}

/// Which runs' processes to find.
#[derive(Debug, Clone, Copy)]
pub enum Runs<'a> {
    /// One run, by id.
    One(&'a str),
    /// Every run of the harness process with this pid (run ids start with `<pid>-`).
    OfHarness(u32),
    /// Every run.
    All,
}

impl Runs<'_> {
    fn matches(&self, value: &[u8]) -> bool {
        match self {
            Runs::One(id) => value == id.as_bytes(),
            Runs::OfHarness(pid) => value.starts_with(format!("{pid}-").as_bytes()),
            Runs::All => true,
        }
    }
}

/// The id of a run: `<harness pid>-<scenario>-<seed>`.
pub fn run_id(scenario: &str, seed: u64) -> String {
    format!("{}-{scenario}-{seed}", std::process::id())
}

/// Pids of every live process whose environment carries `FLOTILLA_CHAOS_RUN` of `runs`.
pub fn marked(runs: Runs<'_>) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for pid in proc_fs::pids() {
        if pid == me {
            continue;
        }
        let Some(env) = proc_fs::environ(pid) else { continue };
        let hit = env.split(|b| *b == 0).any(|kv| {
            kv.strip_prefix(RUN_ENV.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
                .is_some_and(|value| runs.matches(value))
        });
        if hit {
            out.push(pid);
        }
    }
    out
}

/// SIGKILLs (with their process groups) every process of `runs`, scanning again until none
/// is left (an agent killed in the same pass may have just started an engine), for at most
/// 5 s. Returns how many were found.
pub async fn cleanup(runs: Runs<'_>) -> usize {
    let mut found = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let pids = marked(runs);
        if pids.is_empty() || tokio::time::Instant::now() >= deadline {
            return found.len();
        }
        for pid in &pids {
            found.insert(*pid);
            signal(*pid, Signal::CONT);
            signal_group(*pid, Signal::KILL);
            signal(*pid, Signal::KILL);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
