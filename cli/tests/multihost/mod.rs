//! A small lab of "hosts" on one machine for the multi-host test: each host is a network
//! namespace with one veth (`eth0`, 10.251.0.N/24) whose other end is a port of a Linux bridge
//! that lives in a namespace of its own, so nothing touches the root namespace's links or
//! routes and parallel runs (names carry the pid) cannot collide even on the same subnet.
//!
//! ```text
//!   <p>h1 eth0 .1 ─┐
//!   <p>h2 eth0 .2 ─┤
//!   <p>h3 eth0 .3 ─┼─ v1..v5 ── br0   (namespace <p>br)
//!   <p>gw eth0 .10 ┤
//!   <p>cl eth0 .20 ┘
//! ```
//!
//! [`Lab`] owns every namespace and process it starts; dropping it (also on a panic) kills
//! every process left in its namespaces — engines the agents started included — and deletes
//! the namespaces, which deletes the veths and the bridge with them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_testkit::procs::{signal, Signal};

/// The hosts' subnet: private to the lab (the bridge is in its own namespace).
pub const SUBNET: &str = "10.251.0";

/// `ip ARGS`, its stderr as the error.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// One host of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its namespace.
    pub ns: String,
    /// Its address on the bridge.
    pub addr: String,
    /// The bridge port its veth is plugged into (in the bridge's namespace).
    port: String,
}

/// The namespaces, the bridge and the processes of one test run.
pub struct Lab {
    prefix: String,
    bridge_ns: String,
    pub hosts: Vec<Host>,
    procs: Vec<(String, Child)>,
    /// Logs and files of the run; kept (and named) when the test fails.
    pub dir: Option<tempfile::TempDir>,
}

impl Lab {
    /// Makes the bridge and one host per `(name, last address byte)`. An error means
    /// namespaces cannot be made here (not root, no iproute2, EPERM).
    pub fn create(hosts: &[(&str, u8)]) -> Result<Lab, String> {
        let prefix = format!("fmh{}", std::process::id() % 1_000_000);
        let bridge_ns = format!("{prefix}br");
        ip(&["netns", "add", &bridge_ns])?;
        let mut lab = Lab { prefix, bridge_ns, hosts: Vec::new(), procs: Vec::new(), dir: None };
        let b = lab.bridge_ns.clone();
        ip(&["-n", &b, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &b, "link", "set", "br0", "up"])?;
        for (k, (name, last)) in hosts.iter().enumerate() {
            let ns = format!("{}{name}", lab.prefix);
            let port = format!("v{}", k + 1);
            ip(&["netns", "add", &ns])?;
            // Pushed before it is complete, so Drop removes a half-made host too.
            lab.hosts.push(Host { ns: ns.clone(), addr: format!("{SUBNET}.{last}"), port: port.clone() });
            ip(&["-n", &b, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &b, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{SUBNET}.{last}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        lab.dir = Some(tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?);
        Ok(lab)
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("lab dir").path()
    }

    pub fn host(&self, k: usize) -> &Host {
        &self.hosts[k]
    }

    /// Takes host `k`'s switch port down (`up: false`: the kernel drops every frame both
    /// ways, as when a cable or a switch port dies) or back up.
    pub fn link(&self, k: usize, up: bool) {
        let port = &self.hosts[k].port;
        ip(&["-n", &self.bridge_ns, "link", "set", port, if up { "up" } else { "down" }]).expect("set the link");
    }

    /// Starts `argv` in host `k`'s namespace with `env` added, stdout and stderr to
    /// `<dir>/<log>.log`; it is killed when the lab drops.
    pub fn spawn(&mut self, k: usize, log: &str, argv: &[String], env: &[(String, String)]) {
        let file = std::fs::File::create(self.dir().join(format!("{log}.log"))).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.hosts[k].ns])
            .args(argv)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?} in {}: {e}", self.hosts[k].ns));
        self.procs.push((log.to_owned(), child));
    }

    /// Runs `argv` in host `k`'s namespace to completion: (success, stdout, stderr).
    pub fn run(&self, k: usize, argv: &[String], env: &[(String, String)]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.hosts[k].ns])
            .args(argv)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {argv:?}: {e}"));
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    /// Panics if a process the lab started has exited, naming it and its log's tail.
    pub fn assert_running(&mut self) {
        for (name, child) in &mut self.procs {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.dir.as_ref().map(|d| d.path().join(format!("{name}.log"))).unwrap_or_default();
                panic!("{name} exited ({status}):\n{}", tail(&log, 30));
            }
        }
    }

    /// Every process in one of the lab's namespaces.
    fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for ns in self.hosts.iter().map(|h| &h.ns).chain([&self.bridge_ns]) {
            if let Ok(out) = ip(&["netns", "pids", ns]) {
                pids.extend(out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
        pids
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Lab {
    // Drop is synchronous and the test has no runtime: a blocking pause is the only kind.
    #[allow(clippy::disallowed_methods)]
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Engines outlive their agent (the agent unit's KillMode=process): kill whatever is
        // still in the lab's namespaces, then wait for it to go before deleting them.
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                signal(pid, Signal::KILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.bridge_ns]);
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept: PathBuf = dir.keep();
                eprintln!("multihost: logs and configs kept in {}", kept.display());
            }
        }
    }
}
