//! The cut-off leader again, on real addresses: three `flotilla server`s, each in its own
//! network namespace with a veth on one bridge (three hosts on one machine), and the leader's
//! link taken down with `ip link set down` — no proxy in the path, the kernel drops every
//! packet both ways, as when a switch port or a NIC dies. Writers on the two survivors (from
//! the root namespace, over the bridge) measure the time to their next acknowledged write.
//!
//! Needs root and iproute2; prints SKIPPED otherwise (`FLOTILLA_REQUIRE_NETNS=1` makes that a
//! failure). Over 10 cuts: p50 ≤ 1 s, at most one cut over 1.5 s and none over 2.5 s (see
//! [`judge`]), every acknowledged write there at the end.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

mod common;

use common::{assert_all_present, first_ack_after, settled_leader, write_tenants};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
const TRIALS: usize = 10;
const PORT: u16 = 7070;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Three namespaces `<p>s1..3`, each with `<p>s<i>` (inside, 10.231.X.i/24) paired to
/// `<p>h<i>` on the bridge `<p>br` (10.231.X.254/24 in the root namespace). Removed on drop.
struct Hosts {
    prefix: String,
    subnet: String,
}

impl Hosts {
    fn create() -> Result<Hosts, String> {
        let pid = std::process::id();
        let prefix = format!("fl{}", pid % 100_000);
        let subnet = format!("10.231.{}", pid % 250);
        let h = Hosts { prefix, subnet };
        let br = format!("{}br", h.prefix);
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}.254/24", h.subnet), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 1..=3 {
            let ns = h.ns(i);
            let (inner, outer) = (format!("{}s{i}", h.prefix), format!("{}h{i}", h.prefix));
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &br, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", h.addr(i)), "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(h)
    }

    fn ns(&self, i: u64) -> String {
        format!("{}s{i}", self.prefix)
    }

    fn addr(&self, i: u64) -> String {
        format!("{}.{i}", self.subnet)
    }

    fn grpc(&self, i: u64) -> String {
        format!("{}:{PORT}", self.addr(i))
    }

    /// Takes host `i`'s only link down (`up: false`) or back up.
    fn link(&self, i: u64, up: bool) {
        let inner = format!("{}s{i}", self.prefix);
        ip(&["-n", &self.ns(i), "link", "set", &inner, if up { "up" } else { "down" }]).expect("set link");
    }

    fn start_server(&self, i: u64, data: &Path) -> Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(i), BIN, "server", "--id", &i.to_string()])
            .args(["--grpc-addr", &self.grpc(i), "--http-addr", "127.0.0.1:0", "--data-dir"])
            .arg(data.join(format!("s{i}")));
        // a veth address is not loopback: plain gRPC needs --insecure (this test is about
        // Raft timing, the TLS links are covered by the chaos subset and security_roles)
        cmd.arg("--insecure");
        if i == 1 {
            cmd.arg("--bootstrap");
        } else {
            cmd.args(["--join", &self.grpc(1)]);
        }
        let log = std::fs::File::create(data.join(format!("s{i}.log"))).expect("server log");
        // openraft's elections at info (a few lines per cut): a failure prints them
        cmd.env("NO_COLOR", "1")
            .env("RUST_LOG", "warn,openraft::engine=info,openraft::core::raft_core=info,flotilla_cluster=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn a server in its namespace")
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 1..=3 {
            // Deleting the outer end deletes the pair; the namespace itself may outlive its
            // processes while orphaned sockets in it retransmit to the downed link.
            let _ = ip(&["link", "del", &format!("{}h{i}", self.prefix)]);
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &format!("{}br", self.prefix)]);
    }
}

struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_resume_within_a_second_when_the_leaders_link_goes_down() {
    let required = std::env::var("FLOTILLA_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    let hosts = match Hosts::create() {
        Ok(h) => h,
        Err(e) if !required => {
            eprintln!("leader_cut_off_netns: SKIPPED (network namespaces unavailable: {e})");
            return;
        }
        Err(e) => panic!("network namespaces unavailable: {e}"),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut servers = Servers(Vec::new());
    servers.0.push(hosts.start_server(1, dir.path()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 2..=3 {
        servers.0.push(hosts.start_server(i, dir.path()));
    }
    let addrs: Vec<String> = (1..=3).map(|i| hosts.grpc(i)).collect();
    let acks = Arc::new(Mutex::new(Vec::new()));
    let mut gaps = Vec::new();
    for trial in 0..TRIALS {
        let leader = settled_leader(&addrs, Duration::from_secs(30)).await;
        let survivors: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
        let tasks: Vec<_> = survivors
            .iter()
            .map(|i| tokio::spawn(write_tenants(format!("t{trial}-s{i}"), hosts.grpc(*i), acks.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        hosts.link(leader, false);
        let t0 = Instant::now();
        let firsts = loop {
            let firsts: Vec<Option<Duration>> = survivors
                .iter()
                .map(|i| first_ack_after(&acks.lock().unwrap(), &format!("t{trial}-s{i}-"), t0))
                .collect();
            if firsts.iter().all(Option::is_some) || t0.elapsed() > Duration::from_secs(5) {
                break firsts;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        hosts.link(leader, true);
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        eprintln!("trial {trial}: s{leader}'s link down; first acks {firsts:?}");
        for (i, f) in firsts.into_iter().enumerate() {
            gaps.push(
                f.unwrap_or_else(|| panic!("trial {trial}: nothing acknowledged through s{} in 5 s", survivors[i])),
            );
        }
    }
    settled_leader(&addrs, Duration::from_secs(30)).await;
    let all = acks.lock().unwrap().clone();
    assert_all_present(&addrs[0], &all).await;
    gaps.sort();
    let (p50, max) = (gaps[gaps.len() / 2], *gaps.last().expect("trials"));
    eprintln!(
        "time to the next acknowledged write after the link went down: p50 {p50:?}, max {max:?} ({} writes checked)",
        all.len()
    );
    drop(servers);
    let verdict = judge(&gaps);
    if let Err(e) = verdict {
        dump_logs(dir.path());
        panic!("{e}: {gaps:?}");
    }
}

/// The bounds over all cuts' gaps (sorted): p50 ≤ 1 s; at most one of them over 1.5 s and
/// none over 2.5 s. The one allowed outlier is openraft 0.9's known second fault (README,
/// "Known limit"): a survivor that saw a longer log in a vote answer delays its next election
/// by 2 × the maximum election timeout, measured at up to 1.64 s — which the chaos
/// `majority-partition` bound (2 s) allows as well.
fn judge(gaps: &[Duration]) -> Result<(), String> {
    let p50 = gaps[gaps.len() / 2];
    if p50 > Duration::from_secs(1) {
        return Err(format!("p50 {p50:?} > 1 s"));
    }
    let slow = gaps.iter().filter(|g| **g > Duration::from_millis(1500)).count();
    // both survivors of one cut see the same election: one slow cut is two slow gaps
    if slow > 2 {
        return Err(format!("{slow} gaps over 1.5 s (more than one cut)"));
    }
    match gaps.iter().max() {
        Some(max) if *max > Duration::from_millis(2500) => Err(format!("max {max:?} > 2.5 s")),
        _ => Ok(()),
    }
}

/// The servers' election lines (votes, campaigns, leader changes), printed when the bounds fail.
fn dump_logs(dir: &Path) {
    for i in 1..=3 {
        let log = std::fs::read_to_string(dir.join(format!("s{i}.log"))).unwrap_or_default();
        let lines: Vec<&str> =
            log.lines().filter(|l| ["vote", "elect", "campaign", "leader"].iter().any(|w| l.contains(w))).collect();
        eprintln!("---- s{i}.log: election lines (last 150 of {}) ----", lines.len());
        for l in &lines[lines.len().saturating_sub(150)..] {
            eprintln!("{l}");
        }
    }
}
