//! The CI subset of the chaos scenarios (`chaos/scenarios/`), run through the real binary
//! (`flotilla chaos run`), plus proof that the harness fails when an invariant breaks and
//! rejects a malformed scenario. The whole set runs with `flotilla chaos soak`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flotilla_testkit::proc_fs;
use flotilla_testkit::procs::{signal, Signal};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../chaos/scenarios").join(name)
}

/// Live processes a chaos harness with pid `harness` started (their environment carries
/// `FLOTILLA_CHAOS_RUN=<harness pid>-...`).
fn left_behind(harness: u32) -> Vec<u32> {
    let want = format!("FLOTILLA_CHAOS_RUN={harness}-");
    proc_fs::pids()
        .filter(|pid| {
            let Some(env) = proc_fs::environ(*pid) else { return false };
            let zombie = proc_fs::stat(*pid).is_some_and(|s| s.state == 'Z');
            !zombie && env.split(|b| *b == 0).any(|kv| kv.starts_with(want.as_bytes()))
        })
        .collect()
}

fn chaos_run(file: &Path, seed: u64, extra: &[&str]) -> (i32, String) {
    let child = Command::new(BIN)
        .args(["chaos", "run"])
        .arg(file)
        .args(["--seed", &seed.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flotilla chaos");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for flotilla chaos");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let left = left_behind(pid);
    assert!(left.is_empty(), "the run left processes behind: {left:?}\n{text}");
    (out.status.code().unwrap_or(-1), text)
}

/// The CI subset: a leader killed in a loop, the leader in a minority partition, every
/// server down (static stability), an engine crash storm, and the two scenarios that caught
/// bugs — a rolling restart (a stale read from a leader restored within its term) and the
/// leader isolated with an agent (a reschedule emptying the gateway's table). All with
/// security on (`--tls`: TLS on every link through the fault proxies, roles enforced), as a
/// production cluster runs. About 3.5 minutes.
#[test]
fn ci_scenarios_hold_every_invariant() {
    for (name, seed) in [
        ("leader-kill-loop.yaml", 11),
        ("majority-partition.yaml", 12),
        ("servers-down.yaml", 13),
        ("engine-crash-storm.yaml", 14),
        ("rolling-restart.yaml", 15),
        ("leader-isolated-with-agents.yaml", 16),
    ] {
        let (code, out) = chaos_run(&scenario(name), seed, &["--tls"]);
        println!("{out}");
        assert_eq!(code, 0, "{name} (seed {seed}) failed:\n{out}");
        assert!(out.contains("anomalies                          0"), "{out}");
    }
}

/// Latency between the servers (80 ± 40 ms, then 200 ± 50 ms each way): with the Raft
/// timings docs/deploy.md gives for that distance, writes go on (with the defaults, 80 ms
/// stopped every write for the whole fault: the AppendEntries timeout is the heartbeat).
/// About a minute.
#[test]
fn writes_continue_across_wan_latency_with_the_documented_raft_timings() {
    for (name, seed) in [("slow-network.yaml", 21), ("wan-200ms.yaml", 22)] {
        let (code, out) = chaos_run(&scenario(name), seed, &["--tls"]);
        println!("{out}");
        assert_eq!(code, 0, "{name} (seed {seed}) failed:\n{out}");
        assert!(out.contains("anomalies                          0"), "{out}");
    }
}

/// SIGTERM to the harness mid-run: it stops every process of the run, engines included.
#[test]
fn an_interrupted_run_leaves_no_process_behind() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(BIN)
        .args(["chaos", "run"])
        .arg(scenario("engine-crash-storm.yaml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flotilla chaos");
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.by_ref().map_while(Result::ok).any(|l| l.contains("cluster ready"));
    assert!(ready, "the run never got its cluster ready");
    assert!(!left_behind(pid).is_empty(), "the run's processes are visible by their mark");
    assert!(signal(pid, Signal::TERM), "SIGTERM to the harness");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    // SIGKILLed processes take a moment to be gone from /proc.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut left = left_behind(pid);
    while !left.is_empty() && tokio::time::Instant::now() < deadline {
        #[allow(clippy::disallowed_methods)] // a synchronous test polling /proc
        std::thread::sleep(std::time::Duration::from_millis(100));
        left = left_behind(pid);
    }
    assert!(left.is_empty(), "left behind after SIGTERM: {left:?}");
}

/// A gateway killed under load with no engine fault: the data-plane checker must call the
/// failed requests unattributed, exit 1 and print the seed to replay.
#[test]
fn a_violated_invariant_fails_the_run_with_its_seed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway-down.yaml");
    std::fs::write(
        &file,
        "name: gateway-down\ntopology: {servers: 3, agents: 1, models: [{name: demo, replicas: 1}]}\n\
         workload: {duration: 8s, cas_clients: 1, keys: 1, requests_per_second: 10}\n\
         schedule:\n  - {at: 3s, action: kill, target: gateway, duration: 3s}\n",
    )
    .unwrap();
    let (code, out) = chaos_run(&file, 99, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("failed while their engines were up"), "{out}");
    assert!(out.contains("gateway-down --seed 99"), "{out}");
}

#[test]
fn a_malformed_scenario_is_rejected_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "name: bad\ntopology: {servers: 4, agents: 1}\nworkload: {duration: 5s}\n").unwrap();
    let (code, out) = chaos_run(&file, 1, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("topology.servers") && out.contains("3 or 5"), "{out}");
}
