//! `flotilla chaos run|soak|cleanup`: argument parsing and the commands' output. Exit
//! codes: 0 no anomaly, 1 an invariant was violated (the seed to replay it is printed) or
//! the run could not be carried out, 2 a bad scenario file or flag.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio::time::Instant;

use crate::run::{self, Report};
use crate::scenario::Scenario;

/// Fault-injection runs against a real multi-process cluster on this machine.
#[derive(Subcommand, Debug)]
pub enum ChaosCommand {
    /// Run one scenario file: start the cluster, inject its faults, check the invariants.
    ///
    /// Example: flotilla chaos run chaos/scenarios/leader-kill-loop.yaml --seed 7
    Run(RunArgs),
    /// Run every scenario of a directory in a loop for a while, each with a fresh seed.
    ///
    /// Example: flotilla chaos soak --minutes 30
    Soak(SoakArgs),
    /// Kill every process a chaos run left behind (after the harness itself was killed).
    Cleanup,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The scenario file (YAML).
    pub file: PathBuf,
    /// Seed for target choices and client workloads; a failing run prints it to replay.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where processes keep data and logs (default: a temp dir, deleted unless the run fails).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run with security on (TLS on every link, the role table enforced), whatever the
    /// scenario's `topology.tls` says.
    #[arg(long)]
    pub tls: bool,
}

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// How long to keep starting runs (the last one finishes).
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    /// Directory of scenario files.
    #[arg(long, default_value = "chaos/scenarios")]
    pub scenarios: PathBuf,
    /// First seed; each run uses the next one.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// A command's failure: the message and the exit code.
#[derive(Debug)]
pub struct ChaosError {
    pub code: u8,
    pub message: String,
}

fn usage(message: String) -> ChaosError {
    ChaosError { code: 2, message }
}

fn failed(message: String) -> ChaosError {
    ChaosError { code: 1, message }
}

/// Runs a chaos command with the `flotilla` binary at `bin`.
pub async fn run(cmd: ChaosCommand, bin: &Path) -> Result<(), ChaosError> {
    match cmd {
        ChaosCommand::Run(a) => {
            let mut scenario = load(&a.file)?;
            scenario.topology.tls |= a.tls;
            let report = one(&scenario, a.seed, bin, a.dir.as_deref()).await?;
            verdict(&[report])
        }
        ChaosCommand::Soak(a) => soak(a, bin).await,
        ChaosCommand::Cleanup => {
            let n = crate::procs::cleanup(crate::procs::Runs::All).await;
            println!("chaos cleanup: killed {n} process(es) left by chaos runs");
            Ok(())
        }
    }
}

fn load(file: &Path) -> Result<Scenario, ChaosError> {
    let text = std::fs::read_to_string(file).map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
    Scenario::parse(&file.display().to_string(), &text).map_err(|e| usage(e.to_string()))
}

/// One run in `dir` (or a temp dir kept only when the run fails), interruptible.
async fn one(scenario: &Scenario, seed: u64, bin: &Path, dir: Option<&Path>) -> Result<Report, ChaosError> {
    let tmp = tempfile::Builder::new().prefix("flotilla-chaos-").tempdir().map_err(|e| failed(e.to_string()))?;
    let path = dir.map(Path::to_path_buf).unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
    let result = tokio::select! {
        r = run::run(scenario, seed, bin, &path) => r,
        _ = interrupted() => {
            // The run's future was dropped: its direct children died with it (kill on
            // drop), the engines they started are found by their mark.
            crate::procs::cleanup(crate::procs::Runs::OfHarness(std::process::id())).await;
            Err(anyhow::anyhow!("interrupted; every process of the run was stopped"))
        }
    };
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let kept = tmp.keep();
            return Err(failed(format!(
                "scenario {} (seed {seed}) could not run: {e:#}\n  logs: {}",
                scenario.name,
                kept.display()
            )));
        }
    };
    println!("{}", report.table());
    if !report.violations.is_empty() && dir.is_none() {
        let kept = tmp.keep();
        println!("  logs kept in {}", kept.display());
    }
    Ok(report)
}

async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn verdict(reports: &[Report]) -> Result<(), ChaosError> {
    let bad: Vec<&Report> = reports.iter().filter(|r| !r.violations.is_empty()).collect();
    if bad.is_empty() {
        return Ok(());
    }
    let replay: Vec<String> = bad.iter().map(|r| format!("{} --seed {}", r.scenario, r.seed)).collect();
    Err(failed(format!("invariants violated; replay with: {}", replay.join("; "))))
}

async fn soak(a: SoakArgs, bin: &Path) -> Result<(), ChaosError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&a.scenarios)
        .map_err(|e| usage(format!("cannot read {}: {e}", a.scenarios.display())))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(usage(format!("no *.yaml scenarios in {}", a.scenarios.display())));
    }
    let scenarios: Vec<Scenario> = files.iter().map(|f| load(f)).collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(a.minutes * 60);
    let mut reports = Vec::new();
    let mut seed = a.seed;
    'outer: loop {
        for s in &scenarios {
            if Instant::now() >= deadline {
                break 'outer;
            }
            match one(s, seed, bin, None).await {
                Ok(r) => reports.push(r),
                Err(e) if e.code == 1 && e.message.contains("interrupted") => return Err(e),
                Err(e) => {
                    println!("{}", e.message);
                    reports.push(Report {
                        scenario: s.name.clone(),
                        seed,
                        violations: vec![format!("run failed: {}", e.message)],
                        ..Report::default()
                    });
                }
            }
            seed += 1;
        }
    }
    println!("{}", soak_summary(&reports));
    verdict(&reports)
}

/// Totals over a soak.
pub fn soak_summary(reports: &[Report]) -> String {
    let sum = |f: &dyn Fn(&Report) -> usize| reports.iter().map(f).sum::<usize>();
    let max = |f: &dyn Fn(&Report) -> Duration| reports.iter().map(f).max().unwrap_or_default();
    format!(
        "soak: {} runs, {} faults injected, {} store operations checked, {} gateway requests ({} failed during engine faults, {} otherwise), {} anomalies; longest write unavailability {:.2} s, longest gateway outage {:.2} s, slowest convergence {:.1} s",
        reports.len(),
        sum(&|r| r.faults.injected as usize),
        sum(&|r| r.store_ops),
        sum(&|r| r.data.requests),
        sum(&|r| r.data.attributed_failures),
        sum(&|r| r.data.unattributed_failures),
        sum(&|r| r.violations.len()),
        max(&|r| r.longest_write_gap).as_secs_f64(),
        max(&|r| r.data.longest_outage).as_secs_f64(),
        max(&|r| r.convergence.unwrap_or_default()).as_secs_f64(),
    )
}
