//! A leader cut off from the network — not killed — is left as fast as a dead one: three
//! `flotilla server`s with the default Raft timings, every server↔server link through the
//! chaos harness's fault proxy; the leader's links are blackholed both ways (bytes held,
//! nothing closed, as behind a real partition) and writers on the two survivors measure the
//! time to their next acknowledged write. Writers talk to the servers directly, so the
//! survivor that is not elected exercises the forward to a leader that stopped answering.
//!
//! Over 10 cuts: p50 ≤ 1 s and max ≤ 2.5 s through *each* survivor, the isolated leader
//! acknowledges nothing while cut off, and every acknowledged write is there at the end.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_chaos::cluster::Cluster;
use flotilla_chaos::proxy::Fault;
use flotilla_chaos::scenario::Topology;
use tokio::time::Instant;

mod common;

use common::{assert_all_present, first_ack_after, settled_leader, write_tenants, Ack};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
const TRIALS: usize = 10;
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_resume_within_a_second_when_the_leader_is_cut_off() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run_id = format!("cutoff-{}", std::process::id());
    let topo = Topology {
        servers: 3,
        agents: 0,
        gpus_per_agent: 0,
        gateway: false,
        models: Vec::new(),
        small_disks: false,
        tls: false,
        raft: None,
    };
    let mut c = Cluster::start(Path::new(BIN), dir.path(), &run_id, &topo).await.expect("start the cluster");
    let addrs = c.server_addrs();
    let mut gaps: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let acks = Arc::new(Mutex::new(Vec::new()));
    let leader_acks = Arc::new(Mutex::new(Vec::new()));

    for trial in 0..TRIALS {
        let leader = settled_leader(&addrs, Duration::from_secs(15)).await;
        let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        // Writers already running at the cut, so a forward is in flight when it happens.
        let mut tasks = Vec::new();
        for (i, id) in survivors.iter().enumerate() {
            let tag = format!("t{trial}-s{id}-w{i}");
            tasks.push(tokio::spawn(write_tenants(tag, addrs[*id as usize - 1].clone(), acks.clone())));
        }
        let tag = format!("t{trial}-leader");
        tasks.push(tokio::spawn(write_tenants(tag, addrs[leader as usize - 1].clone(), leader_acks.clone())));
        tokio::time::sleep(Duration::from_millis(300)).await;

        let cut = c.net.isolate(&format!("s{leader}"));
        assert!(cut >= 4, "isolating s{leader} cut only {cut} links");
        let t0 = Instant::now();
        // Wait until both survivors' writers have an ack invoked after the cut (or 5 s).
        let firsts = loop {
            let firsts: Vec<Option<Duration>> = survivors
                .iter()
                .enumerate()
                .map(|(i, id)| first_ack_after(&acks.lock().unwrap(), &format!("t{trial}-s{id}-w{i}-"), t0))
                .collect();
            if firsts.iter().all(Option::is_some) || t0.elapsed() > Duration::from_secs(5) {
                break firsts;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let healed = Instant::now();
        // The cut ends as a long partition does: the connections it held are dead (reset, their
        // bytes dropped) and new ones work. Delivering the held bytes instead replays the
        // candidates' stale vote requests to the deposed leader, whose answers (its log longer
        // by its uncommitted entries) make openraft delay the *next* election of whoever
        // receives them by 2 × the maximum election timeout: a second fault, which each trial
        // here must not inherit (README: known limits).
        let links: Vec<(String, String)> = c.net.links().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let cut_off = format!("s{leader}");
        for (from, to) in links.iter().filter(|(a, b)| *a == cut_off || *b == cut_off) {
            c.net.set(from, to, Fault::Reset);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.net.heal_all();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        let prefix = format!("t{trial}-leader-");
        let by_isolated: Vec<Ack> = leader_acks
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.name.starts_with(&prefix) && a.invoked >= t0 && a.answered < healed)
            .cloned()
            .collect();
        assert!(by_isolated.is_empty(), "trial {trial}: the isolated leader s{leader} acknowledged {by_isolated:?}");
        for (i, f) in firsts.iter().enumerate() {
            let f = f
                .unwrap_or_else(|| panic!("trial {trial}: no write acknowledged through s{} within 5 s", survivors[i]));
            gaps[i].push(f);
        }
        eprintln!("trial {trial}: leader s{leader} cut off; first acks {firsts:?}");
    }

    // No acknowledged write lost: every one is there, read linearizably.
    settled_leader(&addrs, Duration::from_secs(15)).await;
    let all: Vec<Ack> = acks.lock().unwrap().iter().chain(leader_acks.lock().unwrap().iter()).cloned().collect();
    assert_all_present(&addrs[0], &all).await;

    // The non-elected survivor forwards; the elected one serves: both within the bound.
    let mut every: Vec<Duration> = Vec::new();
    for g in &mut gaps {
        g.sort();
        every.extend(g.iter().copied());
    }
    every.sort();
    let (p50, max) = (percentile(&every, 0.5), *every.last().expect("trials"));
    eprintln!(
        "time to the next acknowledged write after the cut: p50 {p50:?}, max {max:?} ({} writes checked)",
        all.len()
    );
    assert!(p50 <= Duration::from_secs(1), "p50 {p50:?} > 1 s: {gaps:?}");
    // The max allows a split vote or two on a loaded machine (each another election
    // timeout, 200-400 ms, plus the forward's retry): seen at 1.72 s with the chaos
    // scenarios running beside it. Before the forward was abandoned on a leader change
    // every cut took ~3.1 s, which this still fails.
    assert!(max <= Duration::from_millis(2500), "max {max:?} > 2.5 s: {gaps:?}");
    c.shutdown().await;
}
