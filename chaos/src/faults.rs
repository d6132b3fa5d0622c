//! Executes schedule steps against the running cluster: resolves targets (`leader`,
//! `follower`, `agent`, names) at the moment a step fires, applies the fault, and records
//! what it did (a fault log line) and, for engine faults, the window in which data-plane
//! failures are attributed to it.

use std::time::Duration;

use anyhow::{bail, Context as _};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::procs::State;
use crate::scenario::{Action, Step};

/// How long after an engine fault the gateway may still fail requests to that engine
/// (passive ejection and the agent's next report).
pub const ENGINE_FAULT_SETTLE: Duration = Duration::from_secs(5);

/// What happened during the fault phase.
#[derive(Debug, Default)]
pub struct FaultLog {
    /// (offset, description) of every fault and undo.
    pub entries: Vec<(Duration, String)>,
    /// Windows (offsets) in which an engine was faulted.
    pub engine_windows: Vec<(Duration, Duration)>,
    /// Faults injected (not counting undos).
    pub injected: u32,
    /// Steps that could not run here (e.g. disk faults without root), with why.
    pub skipped: Vec<String>,
}

/// A fault or its undo, at an offset.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Duration,
    pub step: usize,
    pub undo: bool,
}

/// Every event of the schedule, in time order (undo events `duration` after their fault).
pub fn timeline(steps: &[Step], end: Duration) -> Vec<Event> {
    let mut out = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        for t in s.times(end) {
            out.push(Event { at: t, step: i, undo: false });
            if let Some(d) = s.duration {
                out.push(Event { at: t + d, step: i, undo: true });
            }
        }
    }
    out.sort_by_key(|e| (e.at, e.undo));
    out
}

/// Resolves role names to process names.
async fn resolve(c: &mut Cluster, rng: &mut StdRng, who: &str) -> anyhow::Result<Vec<String>> {
    let servers: Vec<String> = c.servers.iter().map(|s| s.proc.name.clone()).collect();
    let agents: Vec<String> = c.agents.iter().map(|a| a.name.clone()).collect();
    Ok(match who {
        "leader" => vec![format!("s{}", c.wait_leader(Duration::from_secs(10)).await?)],
        "followers" | "follower" => {
            let l = format!("s{}", c.wait_leader(Duration::from_secs(10)).await?);
            let f: Vec<String> = servers.into_iter().filter(|s| *s != l).collect();
            if who == "follower" {
                f.choose(rng).cloned().into_iter().collect()
            } else {
                f
            }
        }
        "servers" => servers,
        "server" => servers.choose(rng).cloned().into_iter().collect(),
        "agents" => agents,
        "agent" => agents.choose(rng).cloned().into_iter().collect(),
        "gateway" => vec!["gw".to_string()],
        name => vec![name.to_string()],
    })
}

/// Runs one event. Returns the log line.
pub async fn apply(
    c: &mut Cluster,
    rng: &mut StdRng,
    step: &Step,
    undo: bool,
    t0: Instant,
    log: &mut FaultLog,
) -> anyhow::Result<()> {
    let now = t0.elapsed();
    let target = match &step.target {
        Some(t) if !undo => resolve(c, rng, t).await?,
        _ => Vec::new(),
    };
    let line = match (step.action, undo) {
        (Action::Kill, false) => {
            for t in &target {
                c.proc_mut(t).with_context(|| format!("no process {t}"))?.kill().await;
            }
            format!("kill {}", target.join(","))
        }
        (Action::Kill, true) | (Action::Restart, _) | (Action::KillAllServers, true) => {
            let names = match step.action {
                Action::Restart => target,
                _ => down_processes(c),
            };
            for n in &names {
                let run_id = c.run_id.clone();
                c.proc_mut(n).with_context(|| format!("no process {n}"))?.start(&run_id)?;
            }
            format!("restart {}", names.join(","))
        }
        (Action::Pause, false) => {
            for t in &target {
                c.proc_mut(t).with_context(|| format!("no process {t}"))?.pause();
            }
            format!("pause {}", target.join(","))
        }
        (Action::Pause, true) | (Action::Resume, _) => {
            let names: Vec<String> = if step.action == Action::Resume { target } else { paused_processes(c) };
            for n in &names {
                c.proc_mut(n).with_context(|| format!("no process {n}"))?.resume();
            }
            format!("resume {}", names.join(","))
        }
        (Action::Partition, false) => {
            let groups = step.groups.clone().unwrap_or_default();
            let mut sides = Vec::new();
            for g in &groups {
                let mut side = Vec::new();
                for who in g {
                    side.extend(resolve(c, rng, who).await?);
                }
                sides.push(side);
            }
            // A process named on both sides (e.g. `leader` and `servers`) stays with the first.
            let a = sides[0].clone();
            let b: Vec<String> = sides[1].iter().filter(|x| !a.contains(x)).cloned().collect();
            let ar: Vec<&str> = a.iter().map(String::as_str).collect();
            let br: Vec<&str> = b.iter().map(String::as_str).collect();
            c.net.partition(&ar, &br);
            format!("partition [{}] | [{}]", a.join(","), b.join(","))
        }
        (Action::OneWay, false) => {
            let from = resolve(c, rng, step.from.as_deref().unwrap_or_default()).await?;
            let to = resolve(c, rng, step.to.as_deref().unwrap_or_default()).await?;
            for f in &from {
                for t in &to {
                    c.net.one_way(f, t);
                }
            }
            format!("one-way loss {} -> {}", from.join(","), to.join(","))
        }
        (Action::Delay, false) => {
            let from = resolve(c, rng, step.from.as_deref().unwrap_or_default()).await?;
            let to = resolve(c, rng, step.to.as_deref().unwrap_or_default()).await?;
            let latency = step.latency.unwrap_or_default();
            let jitter = step.jitter.unwrap_or_default();
            for f in &from {
                for t in &to {
                    c.net.delay(f, t, latency, jitter);
                }
            }
            format!("delay {latency:?}±{jitter:?} {} <-> {}", from.join(","), to.join(","))
        }
        (Action::Partition | Action::OneWay | Action::Delay, true) | (Action::Heal, _) => {
            c.net.heal_all();
            "heal the network".to_string()
        }
        (Action::DiskFull, false) => {
            for t in &target {
                fill_disk(c, t).await?;
            }
            format!("disk full on {}", target.join(","))
        }
        (Action::DiskFull, true) | (Action::DiskFree, _) => {
            for s in &c.servers {
                let _ = tokio::fs::remove_file(s.data_dir.join("ballast")).await;
            }
            "free the disks".to_string()
        }
        (Action::EngineCrash, false) => {
            let n = engine_fault(c, rng, step.count.unwrap_or(1), &serde_json::json!({"crash": true})).await?;
            log.engine_windows.push((now, now + ENGINE_FAULT_SETTLE));
            format!("crash {n} engine(s)")
        }
        (Action::EngineCrash, true) => return Ok(()),
        (Action::EngineFault, false) => {
            let patch = step.fault.clone().unwrap_or_default();
            let n = engine_fault(c, rng, step.count.unwrap_or(1), &patch).await?;
            let until = now + step.duration.unwrap_or(Duration::from_secs(3600)) + ENGINE_FAULT_SETTLE;
            log.engine_windows.push((now, until));
            format!("engine fault {patch} on {n} engine(s)")
        }
        (Action::EngineFault, true) => {
            let n = engine_fault(c, rng, u32::MAX, &serde_json::json!({"reset": true})).await?;
            format!("reset faults on {n} engine(s)")
        }
        (Action::KillAllServers, false) => {
            for s in &mut c.servers {
                s.proc.kill().await;
            }
            "kill every server".to_string()
        }
        (Action::RollingRestart, false) => {
            let names: Vec<String> = c.servers.iter().map(|s| s.proc.name.clone()).collect();
            for n in &names {
                let run_id = c.run_id.clone();
                let p = c.proc_mut(n).context("server")?;
                p.kill().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                p.start(&run_id)?;
                c.wait_leader(Duration::from_secs(20)).await?;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            format!("rolling restart of {}", names.join(","))
        }
        (Action::RollingRestart, true) => return Ok(()),
    };
    if !undo {
        log.injected += 1;
    }
    log.entries.push((now, line));
    Ok(())
}

/// Names of the servers, agents and gateway in `state`.
fn processes_in(c: &mut Cluster, state: State) -> Vec<String> {
    let mut out = Vec::new();
    let procs =
        c.servers.iter_mut().map(|s| &mut s.proc).chain(c.agents.iter_mut()).chain(c.gateway.as_mut().map(|(g, _)| g));
    for p in procs {
        if p.state() == state {
            out.push(p.name.clone());
        }
    }
    out
}

fn down_processes(c: &mut Cluster) -> Vec<String> {
    processes_in(c, State::Down)
}

fn paused_processes(c: &mut Cluster) -> Vec<String> {
    processes_in(c, State::Paused)
}

/// Heals everything at the end of the fault phase: network, paused and killed processes,
/// disks, engine faults.
pub async fn heal_everything(c: &mut Cluster) -> anyhow::Result<Vec<String>> {
    c.net.heal_all();
    let mut done = Vec::new();
    for n in paused_processes(c) {
        if let Some(p) = c.proc_mut(&n) {
            p.resume();
        }
        done.push(format!("resume {n}"));
    }
    for n in down_processes(c) {
        let run_id = c.run_id.clone();
        if let Some(p) = c.proc_mut(&n) {
            p.start(&run_id)?;
        }
        done.push(format!("restart {n}"));
    }
    for s in &c.servers {
        let _ = tokio::fs::remove_file(s.data_dir.join("ballast")).await;
    }
    Ok(done)
}

async fn fill_disk(c: &Cluster, name: &str) -> anyhow::Result<()> {
    let s = c.servers.iter().find(|s| s.proc.name == name).with_context(|| format!("{name} is not a server"))?;
    if !s.small_disk {
        bail!("{name} has no small disk");
    }
    use tokio::io::AsyncWriteExt as _;
    let mut f = tokio::fs::File::create(s.data_dir.join("ballast")).await?;
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).await.is_ok() {}
    let _ = f.flush().await;
    Ok(())
}

/// Sends a sim fault patch to `count` random Ready engines; returns how many took it.
async fn engine_fault(
    c: &mut Cluster,
    rng: &mut StdRng,
    count: u32,
    patch: &serde_json::Value,
) -> anyhow::Result<usize> {
    let mut endpoints = Vec::new();
    let models = model_names(c).await;
    for m in models {
        endpoints.extend(c.ready_replicas(&m).await.unwrap_or_default());
    }
    let chosen: Vec<String> = if count as usize >= endpoints.len() {
        endpoints
    } else {
        endpoints.choose_multiple(rng, count as usize).cloned().collect()
    };
    let mut n = 0;
    for e in &chosen {
        if crate::data_plane::post_json(e, "/sim/faults", patch).await.is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

async fn model_names(c: &Cluster) -> Vec<String> {
    let Some(mut o) = c.objects().await else { return Vec::new() };
    let req = flotilla_api::pb::ListRequest { kind: "model".into(), label_selector: String::new(), stale: true };
    match o.list(req).await {
        Ok(r) => r.into_inner().objects.into_iter().map(|o| o.name).collect(),
        Err(_) => Vec::new(),
    }
}
