//! One scenario run, start to verdict:
//!
//! ```text
//!  start cluster ─> apply models, wait Ready ─> t0: workloads + placement watch + schedule
//!    ─> t0+duration: heal everything ─> wait until models converge ─> final reads
//!    ─> check histories (linearizable, no lost write), placement, data plane ─> report
//! ```
//!
//! The verdict is in [`Report::violations`]; the caller prints [`Report::table`] and exits
//! non-zero with the seed when there is any.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::data_plane::{self, DataSummary};
use crate::faults::{self, FaultLog};
use crate::linearizability::{self, Op};
use crate::placement::PlacementChecker;
use crate::scenario::Scenario;
use crate::store_client;

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub faults: FaultLog,
    pub store_ops: usize,
    pub indeterminate_ops: usize,
    pub keys: u32,
    /// Longest stretch without an acknowledged write, during the fault phase.
    pub longest_write_gap: Duration,
    pub placement_events: u64,
    /// Sim engine processes that exited during the run (crashed, or stopped by an agent).
    pub engine_deaths: usize,
    pub data: DataSummary,
    /// Heal → every model converged (None: did not within the bound).
    pub convergence: Option<Duration>,
    pub violations: Vec<String>,
    pub wall: Duration,
}

impl Report {
    /// The summary table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let row = |t: &mut String, k: &str, v: String| t.push_str(&format!("  {k:<34} {v}\n"));
        t.push_str(&format!("scenario {} (seed {}) in {:.0} s\n", self.scenario, self.seed, self.wall.as_secs_f64()));
        row(&mut t, "faults injected", self.faults.injected.to_string());
        for s in &self.faults.skipped {
            row(&mut t, "skipped", s.clone());
        }
        row(
            &mut t,
            "store operations (indeterminate)",
            format!("{} ({}) on {} keys", self.store_ops, self.indeterminate_ops, self.keys),
        );
        row(&mut t, "longest write unavailability", format!("{:.2} s", self.longest_write_gap.as_secs_f64()));
        row(&mut t, "placement events checked", self.placement_events.to_string());
        row(&mut t, "engine processes that exited", self.engine_deaths.to_string());
        let d = &self.data;
        row(
            &mut t,
            "gateway requests ok / failed",
            format!(
                "{} / {} ({} during engine faults, {} otherwise)",
                d.ok,
                d.attributed_failures + d.unattributed_failures,
                d.attributed_failures,
                d.unattributed_failures
            ),
        );
        row(&mut t, "longest gateway outage", format!("{:.2} s", d.longest_outage.as_secs_f64()));
        row(
            &mut t,
            "convergence after heal",
            self.convergence.map_or("NOT within the bound".to_string(), |c| format!("{:.1} s", c.as_secs_f64())),
        );
        row(&mut t, "anomalies", self.violations.len().to_string());
        for v in &self.violations {
            t.push_str(&format!("    - {v}\n"));
        }
        t
    }
}

/// Longest gap between acknowledged writes (or from `start`/to `end`).
fn longest_write_gap(history: &[Op], end_ns: u64) -> Duration {
    let mut acks: Vec<u64> =
        history.iter().filter(|o| o.acknowledged_write().is_some()).filter_map(|o| o.complete).collect();
    acks.sort_unstable();
    let mut prev = 0u64;
    let mut gap = 0u64;
    for a in acks.iter().copied().chain([end_ns]) {
        gap = gap.max(a.saturating_sub(prev));
        prev = prev.max(a);
    }
    Duration::from_nanos(gap)
}

/// Runs `scenario` with `seed`, processes from `bin`, files under `dir`.
pub async fn run(scenario: &Scenario, seed: u64, bin: &Path, dir: &Path) -> anyhow::Result<Report> {
    let started = Instant::now();
    let run_id = crate::procs::run_id(&scenario.name, seed);
    let mut report =
        Report { scenario: scenario.name.clone(), seed, keys: scenario.workload.keys, ..Report::default() };
    println!(
        "chaos: {}: starting {} servers, {} agents",
        scenario.name, scenario.topology.servers, scenario.topology.agents
    );
    let mut cluster = Cluster::start(bin, dir, &run_id, &scenario.topology).await?;
    let result = drive(scenario, seed, &mut cluster, &mut report).await;
    cluster.shutdown().await;
    result?;
    report.wall = started.elapsed();
    Ok(report)
}

async fn drive(scenario: &Scenario, seed: u64, cluster: &mut Cluster, report: &mut Report) -> anyhow::Result<()> {
    let topo = &scenario.topology;
    for m in &topo.models {
        cluster.apply_model(&m.name, m.replicas, m.gpus).await?;
    }
    wait_converged(cluster, scenario, Duration::from_secs(60))
        .await
        .context("models never became Ready before the faults")?;
    if let (Some((_, gw)), Some(m)) = (&cluster.gateway, topo.models.first()) {
        wait_gateway_serves(gw, &m.name).await?;
    }
    println!("chaos: {}: cluster ready; fault phase of {:?}", scenario.name, scenario.workload.duration);

    let w = &scenario.workload;
    let t0 = Instant::now();
    let servers = cluster.server_addrs();
    let mut clients = Vec::new();
    for id in 0..w.cas_clients {
        clients.push(tokio::spawn(store_client::client(
            id,
            cluster.dialer.clone(),
            servers.clone(),
            w.keys,
            seed,
            t0,
            w.duration,
        )));
    }
    let data = match (&cluster.gateway, topo.models.first()) {
        (Some((_, addr)), Some(m)) if w.requests_per_second > 0 => Some(tokio::spawn(data_plane::run(
            addr.clone(),
            m.name.clone(),
            w.requests_per_second,
            w.request_tokens,
            t0,
            w.duration,
        ))),
        _ => None,
    };
    let deaths = Arc::new(Mutex::new(Vec::new()));
    let engine_watch = tokio::spawn(crate::watch::engine_deaths(cluster.run_id.clone(), t0, deaths.clone()));
    let checker = Arc::new(Mutex::new(PlacementChecker::default()));
    let placement = tokio::spawn(crate::watch::placement(cluster.dialer.clone(), servers.clone(), checker.clone()));

    let mut rng = StdRng::seed_from_u64(seed);
    for ev in faults::timeline(&scenario.schedule, w.duration) {
        tokio::time::sleep_until(t0 + ev.at).await;
        let step = &scenario.schedule[ev.step];
        if let Err(e) = faults::apply(cluster, &mut rng, step, ev.undo, t0, &mut report.faults).await {
            report.faults.skipped.push(format!("{:?} at {:?}: {e:#}", step.action, ev.at));
        }
    }
    tokio::time::sleep_until(t0 + w.duration).await;
    for line in faults::heal_everything(cluster).await? {
        report.faults.entries.push((t0.elapsed(), line));
    }
    let healed = Instant::now();
    report.convergence =
        wait_converged(cluster, scenario, scenario.checks.convergence_within).await.ok().map(|_| healed.elapsed());
    if report.convergence.is_none() {
        report
            .violations
            .push(format!("models did not converge within {:?} after healing", scenario.checks.convergence_within));
    }

    let mut history = Vec::new();
    for c in clients {
        history.extend(c.await.unwrap_or_default());
    }
    let end_ns = w.duration.as_nanos() as u64;
    report.longest_write_gap = longest_write_gap(&history, end_ns);
    if let Some(bound) = scenario.checks.max_write_unavailability.filter(|b| report.longest_write_gap > *b) {
        report.violations.push(format!(
            "no write was acknowledged for {:.2} s (bound {:.2} s)",
            report.longest_write_gap.as_secs_f64(),
            bound.as_secs_f64()
        ));
    }
    history.extend(store_client::final_reads(&cluster.dialer, &servers, w.keys, t0).await);
    report.store_ops = history.len();
    report.indeterminate_ops = history.iter().filter(|o| o.complete.is_none()).count();
    let lin = linearizability::check(&history);
    for a in &lin.anomalies {
        report.violations.push(format!("not linearizable: {a}"));
    }
    for l in linearizability::lost_writes(&history) {
        report.violations.push(format!("lost write: {l}"));
    }
    if !lin.anomalies.is_empty() {
        let path = cluster.dir.join("history.json");
        if std::fs::write(&path, serde_json::to_vec(&history).unwrap_or_default()).is_ok() {
            report.violations.push(format!("history saved to {}", path.display()));
        }
    }

    if let Some(d) = data {
        let outcomes = d.await.unwrap_or_default();
        engine_watch.abort();
        // Engines that died for any reason — injected, or stopped by the control plane when
        // it moved their replica — open a window like an injected engine fault.
        let died: Vec<Duration> = deaths.lock().unwrap_or_else(|p| p.into_inner()).clone();
        report.engine_deaths = died.len();
        let mut windows = report.faults.engine_windows.clone();
        windows
            .extend(died.iter().map(|d| (d.saturating_sub(Duration::from_secs(1)), *d + faults::ENGINE_FAULT_SETTLE)));
        report.data = data_plane::summarize(&outcomes, &windows);
        if report.data.unattributed_failures > scenario.checks.allowed_unattributed_failures as usize {
            report.violations.push(format!(
                "{} gateway requests failed while their engines were up (allowed {}): {}",
                report.data.unattributed_failures,
                scenario.checks.allowed_unattributed_failures,
                report.data.examples.join("; ")
            ));
        }
    }
    placement.abort();
    let p = checker.lock().unwrap_or_else(|p| p.into_inner());
    report.placement_events = p.events;
    report.violations.extend(p.violations.iter().cloned());
    Ok(())
}

/// Waits until a request for `model` through the gateway succeeds: the gateway learns the
/// endpoints from its watch, a moment after the store has them.
async fn wait_gateway_serves(gw: &str, model: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let body = serde_json::json!({"model": model, "prompt": "ready?", "max_tokens": 1});
    while crate::data_plane::post_json(gw, "/v1/completions", &body).await.is_err() {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "the gateway did not serve {model} within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits until every model of the scenario has its desired number of Ready replicas.
async fn wait_converged(cluster: &Cluster, scenario: &Scenario, bound: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let mut all = true;
        for m in &scenario.topology.models {
            let ready = cluster.ready_replicas(&m.name).await.map(|r| r.len()).unwrap_or(0);
            all &= ready == m.replicas as usize;
        }
        if all {
            return Ok(());
        }
        anyhow::ensure!(t0.elapsed() < bound, "not converged after {bound:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
