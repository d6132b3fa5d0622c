//! One engine's life, as one task: download (engines that need weights), spawn, wait for
//! `/health`, watch it (scraping load each heartbeat interval), restart it with backoff
//! when it crashes, give up after too many crashes, and stop it on request. Its state is
//! published in a shared [`EngineReport`] that heartbeats copy. Before anything, the
//! Model's `engine_args` are checked against the node's [`crate::engine_policy`] (a refusal
//! fails the replica, naming the flag), and the engine gets its API key: a new one
//! ([`crate::engine_key`]), or the one an adopted engine was started with, kept across its
//! restarts and sent on every `/v1` call the agent makes to it; likewise its TLS certificate
//! ([`crate::engine_tls`]), whose pin the agent's own calls to it hold. Beside this life cycle, in
//! the same task, the [`super::lora_worker::Worker`] keeps the engine's LoRA adapters equal to
//! the assigned list; the life cycle tells it the endpoint once ready, each `/v1/models`
//! scrape, and the end of each process.
//!
//! ```text
//!  downloading ─> starting ─> ready ─(exit)─> crashed ─(backoff)─> starting ...
//!       │             └─(exit / start timeout)──┘   └─(too many)─> failed
//!       └─(error)─> failed              any ─(stop)─> stopping ─> stopped
//!                            ready ─(unassigned)─> draining ─> stopping ─> stopped
//! ```
//!
//! A member of a multi-node replica (`gang` in the assignment; [`crate::gang`] has the whole
//! picture) runs the same life with three differences. A head (rank 0) first gets a
//! rendezvous port from the engine port range, kept across its restarts and reported as
//! `rendezvous` until the task ends. A worker (rank > 0) whose head address is not known
//! yet downloads the weights, then waits in `starting` ([`crate::gang::WAITING_FOR_HEAD`])
//! and is never launched: the
//! address comes as a changed assignment, which replaces this task. A launched worker is
//! headless: it has no port, no endpoint, no TLS and no `/health`; it turns `ready` (with
//! an empty endpoint) after [`crate::gang::WORKER_SETTLE`] of running, and its exit is a
//! crash like any engine's.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_api::pb::{AdapterAssignment, EngineReport, ReplicaAssignment};
use flotilla_engine::{EngineClient, EngineKey};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::Instant;

use super::backoff::{AfterCrash, CrashHistory};
use super::drain::{self, StopMode};
use super::logs::LogFile;
use super::lora_worker::{EngineView, Worker};
use super::process::{self, ProcessIdentity};
use super::start_trace::StartTrace;
use super::EngineEnv;
use crate::download::{Progress, RateMeter};
use crate::driver::{EngineDriver, GangLaunch, LaunchSpec};
use crate::state::SavedEngine;

/// An engine's published state.
pub type SharedReport = Arc<Mutex<EngineReport>>;

/// A running engine process: our child, or one adopted from a previous agent.
enum Proc {
    Child(Child),
    Adopted,
}

struct Running {
    proc: Proc,
    id: ProcessIdentity,
    /// Its API port; 0 for a headless gang worker (none).
    port: u16,
    started_at: Instant,
    /// A gang worker: no API, ready once it has run a while.
    headless: bool,
    /// A P/D member's connector ports, `(first, count)`.
    connector_ports: Option<(u16, u16)>,
}

enum Outcome {
    /// Asked to stop; `ready`: the engine was serving (and may have requests in flight).
    Stop {
        ready: bool,
    },
    Crash(String),
}

fn update(report: &SharedReport, f: impl FnOnce(&mut EngineReport)) {
    f(&mut report.lock().unwrap_or_else(|p| p.into_inner()));
}

fn set_state(report: &SharedReport, state: &str, reason: &str) {
    update(report, |r| {
        r.state = state.into();
        r.reason = reason.into();
    });
}

async fn stop_requested(stop: &mut watch::Receiver<StopMode>) {
    // A dropped sender also means stop.
    let _ = stop.wait_for(|s| *s != StopMode::Run).await;
}

/// Runs one engine until it is told to stop. `adopted` is an engine a previous agent
/// started and that is still alive. `adapters` is the current adapter list (the one in
/// `a` is ignored): it changes without a restart.
pub async fn run(
    env: Arc<EngineEnv>,
    a: ReplicaAssignment,
    report: SharedReport,
    mut stop: watch::Receiver<StopMode>,
    adopted: Option<SavedEngine>,
    adapters: watch::Receiver<Vec<AdapterAssignment>>,
) {
    let start = StartTrace::new(&a, &env.cfg.node_name, adopted.is_some());
    let parser = crate::engine_policy::Parser::of(&a.engine);
    let refused = match crate::engine_policy::check(&env.cfg.engine_policy, parser, &a.engine_args) {
        Err(refusal) => Some(refusal.to_string()),
        Ok(()) if a.engine_image.is_empty() => None,
        Ok(()) => crate::container::refusal(env.cfg.containers.as_ref(), &a.engine_image),
    };
    let refused = refused.or_else(|| a.gang.as_ref().and_then(|g| crate::gang::refusal(g, env.cfg.ray.is_some())));
    // A P/D member: its connector (refused when unknown) and the ports it needs.
    let connector = a.kv_transfer.as_ref().map(|k| connector_plan(k, parser, &a)).transpose();
    let (refused, connector) = match (refused, connector) {
        (Some(r), _) => (Some(r), None),
        (None, Err(why)) => (Some(why), None),
        (None, Ok(c)) => (None, c),
    };
    let refused = refused.or_else(|| {
        let ray = a.gang.as_ref().is_some_and(crate::gang::is_ray);
        (ray && !a.engine_image.is_empty()).then(|| {
            "a layout: ray member runs its Ray node on the host; engine_image is not supported with it".to_string()
        })
    });
    if let Some(refusal) = refused {
        tracing::error!(replica = %a.replica, reason = %refusal, "engine refused by this agent's policy; engine not started");
        if let Some(s) = &adopted {
            // Started under an earlier policy: it must not keep running under this one.
            s.process.stop(env.cfg.stop_grace).await;
            remove_container(&env, &a).await;
            let _ = env.state.remove(&a.replica);
            crate::engine_tls::remove(&env.cfg.data_dir, &a.replica);
        }
        set_state(&report, "failed", &refusal);
        start.end("failed", &refusal);
        return park(&mut stop, &report).await;
    }
    let key = match &adopted {
        Some(s) => s.api_key.as_deref().and_then(EngineKey::new),
        None => match crate::engine_key::generate() {
            Ok(k) => Some(k),
            Err(reason) => {
                set_state(&report, "failed", &reason);
                start.end("failed", &reason);
                return park(&mut stop, &report).await;
            }
        },
    };
    update(&report, |r| r.api_key = key.as_ref().map(|k| k.expose().to_string()).unwrap_or_default());
    let cfg = &env.cfg;
    // A headless gang worker serves nothing: no certificate.
    let serves = a.gang.as_ref().is_none_or(crate::gang::is_head);
    let tls = match crate::engine_tls::prepare(
        &cfg.data_dir,
        &a.replica,
        &cfg.address,
        cfg.engine_tls && serves,
        adopted.as_ref(),
    )
    .await
    {
        Ok(t) => t,
        Err(reason) => {
            if let Some(s) = &adopted {
                // Its pin is unreadable: no client could trust it.
                s.process.stop(cfg.stop_grace).await;
                let _ = env.state.remove(&a.replica);
            }
            crate::engine_tls::remove(&cfg.data_dir, &a.replica);
            set_state(&report, "failed", &reason);
            start.end("failed", &reason);
            return park(&mut stop, &report).await;
        }
    };
    update(&report, |r| r.engine_cert_sha256 = tls.as_ref().map(|t| t.pin.hex()).unwrap_or_default());
    // The agent's own calls to the engine accept its certificate while this task runs.
    let _pin = tls.as_ref().and_then(|t| env.engine.pins().hold(&env.cfg.address, t.pin));
    let client = env.engine.with_key(key.clone()).with_tls(tls.is_some());
    let (view, view_rx) = watch::channel(EngineView::default());
    let initial = adapters.borrow().clone();
    let worker = Worker::new(env.clone(), client.clone(), &a.replica, report.clone(), initial, adopted.is_some());
    let (data_dir, replica) = (env.cfg.data_dir.clone(), a.replica.clone());
    let life = life(
        Engine { env, client, key, tls, kind: a.engine.clone(), start, connector },
        a,
        report,
        stop,
        adopted,
        adapters.clone(),
        view,
    );
    // The worker ends when `life` drops the view sender; `life` decides when both end.
    tokio::select! {
        () = life => {}
        () = worker.run(adapters, view_rx) => {}
    }
    // Stopped for good (an agent exiting aborts this task before here, leaving the files to
    // the engine it leaves running).
    crate::engine_tls::remove(&data_dir, &replica);
}

/// What one engine's tasks share: the agent's, and the engine's key with a client that
/// sends it.
struct Engine {
    env: Arc<EngineEnv>,
    client: EngineClient,
    /// None only for an adopted engine started before keys existed.
    key: Option<EngineKey>,
    /// The certificate it serves TLS with; None: plain HTTP.
    tls: Option<crate::engine_tls::EngineCert>,
    /// `sim` or `vllm` (metrics labels).
    kind: String,
    /// The spans of its start, when traced.
    start: StartTrace,
    /// A P/D member's connector and what it needs ([`crate::kv_transfer`]).
    connector: Option<(crate::kv_transfer::KvTransfer, crate::kv_transfer::Plan)>,
}

/// A P/D member's connector, or why this agent refuses it: an unknown connector or role,
/// `--kv-transfer-config` in the Model's arguments, or a shape the connector cannot take.
fn connector_plan(
    k: &flotilla_api::pb::KvTransferAssignment,
    parser: crate::engine_policy::Parser,
    a: &ReplicaAssignment,
) -> Result<(crate::kv_transfer::KvTransfer, crate::kv_transfer::Plan), String> {
    let kv = crate::kv_transfer::KvTransfer::parse(k)?;
    crate::engine_policy::check_kv_transfer_member(parser, &a.engine_args).map_err(|r| r.to_string())?;
    let plan = crate::kv_transfer::plan(&kv, &a.engine_args, a.gang.as_ref())?;
    Ok((kv, plan))
}

/// The engine process's life cycle (see the module diagram).
async fn life(
    engine: Engine,
    a: ReplicaAssignment,
    report: SharedReport,
    mut stop: watch::Receiver<StopMode>,
    adopted: Option<SavedEngine>,
    adapters: watch::Receiver<Vec<AdapterAssignment>>,
    view: watch::Sender<EngineView>,
) {
    let env = engine.env.clone();
    let replica = a.replica.clone();
    let driver: &dyn EngineDriver = match a.engine.as_str() {
        "sim" => &env.sim,
        "vllm" => &env.vllm,
        other => {
            let why = format!("unknown engine {other:?}; this agent runs sim and vllm");
            set_state(&report, "failed", &why);
            engine.start.end("failed", &why);
            return park(&mut stop, &report).await;
        }
    };
    // An engine adopted from a previous run skips the download, so its source is checked
    // here: started under an earlier source policy, it must not keep running under this one.
    if let Some(s) = adopted.as_ref().filter(|_| driver.needs_weights()) {
        if let Err(refusal) = env.cfg.source_policy.check(&a.source) {
            tracing::error!(replica = %replica, reason = %refusal, "adopted engine's source is refused; stopping it");
            s.process.stop(env.cfg.stop_grace).await;
            let _ = env.state.remove(&replica);
            set_state(&report, "failed", &refusal.to_string());
            engine.start.end("failed", &refusal.to_string());
            return park(&mut stop, &report).await;
        }
    }
    // A gang head's rendezvous port: the one it was adopted with, else a new one; held (and
    // reported) until this task ends, across the engine's restarts.
    let rendezvous = match a.gang.as_ref().filter(|g| crate::gang::is_head(g)) {
        None => None,
        Some(g) => match Rendezvous::hold(&env, &report, adopted.as_ref(), crate::gang::is_ray(g)) {
            Some(r) => Some(r),
            None => {
                if let Some(s) = &adopted {
                    // Its workers cannot be told where it is: start it over.
                    s.process.stop(env.cfg.stop_grace).await;
                    let _ = env.state.remove(&replica);
                }
                let why = format!("no free port in {:?} for the gang's rendezvous", env.cfg.ports);
                set_state(&report, "failed", &why);
                engine.start.end("failed", &why);
                return park(&mut stop, &report).await;
            }
        },
    };
    let rendezvous_port = rendezvous.as_ref().map(|r| r.port);
    let head_token = rendezvous.as_ref().and_then(|r| r.token.as_deref());
    let gang = match a.gang.as_ref() {
        None => None,
        Some(g) if !crate::gang::is_head(g) && g.head_address.is_empty() && adopted.is_none() => {
            // Nothing to launch until the head's address comes (as a new assignment), but the
            // weights can be fetched meanwhile: the next task finds them in the cache, so
            // the head does not wait on this member's download after it starts listening.
            if driver.needs_weights() && download(&engine, &a, &report, &mut stop).await.is_none() {
                return;
            }
            set_state(&report, "starting", crate::gang::WAITING_FOR_HEAD);
            stop_requested(&mut stop).await;
            return set_state(&report, "stopped", "");
        }
        Some(g) => match gang_launch(&env, g, rendezvous_port, head_token) {
            Ok(launch) => Some(launch),
            Err(why) => {
                if let Some(s) = &adopted {
                    s.process.stop(env.cfg.stop_grace).await;
                    let _ = env.state.remove(&replica);
                }
                set_state(&report, "failed", &why);
                engine.start.end("failed", &why);
                return park(&mut stop, &report).await;
            }
        },
    };
    let headless = gang.as_ref().is_some_and(|g| g.headless);
    let log = LogFile::new(&env.log_dir, &replica, env.cfg.log_max_bytes, env.cfg.log_keep);
    let mut history = CrashHistory::default();
    let mut restarts = adopted.as_ref().map(|s| s.restarts).unwrap_or(0);
    update(&report, |r| r.restarts = restarts);
    let mut running = adopted.map(|s| {
        if s.port != 0 {
            env.ports.reserve(s.port);
        }
        if let Some((first, n)) = s.connector_ports {
            env.ports.reserve_block(first, n);
        }
        update(&report, |r| {
            r.state = "starting".into();
            r.pid = s.process.pid;
            r.endpoint = if headless { String::new() } else { env.endpoint(s.port) };
        });
        tracing::info!(replica = %replica, pid = s.process.pid, port = s.port, "adopted running engine");
        Running {
            proc: Proc::Adopted,
            id: s.process,
            port: s.port,
            started_at: Instant::now(),
            headless,
            connector_ports: s.connector_ports,
        }
    });

    let model_path = match running.is_none() && driver.needs_weights() {
        false => None,
        true => match download(&engine, &a, &report, &mut stop).await {
            Some(p) => Some(p),
            None => return,
        },
    };

    loop {
        if running.is_none() {
            // a container left by a crashed agent holds the replica's container name
            remove_container(&env, &a).await;
        }
        if running.is_none() {
            engine.start.engine_start(restarts);
        }
        let mut run = match running.take() {
            Some(r) => r,
            None => match launch(
                &engine,
                driver,
                &a,
                &adapters,
                model_path.as_deref(),
                &log,
                &report,
                restarts,
                gang.as_ref(),
                rendezvous_port,
            ) {
                Ok(r) => r,
                Err(reason) => {
                    if !after_crash(
                        &reason,
                        Instant::now(),
                        &mut history,
                        &env,
                        &report,
                        &mut stop,
                        &mut restarts,
                        &replica,
                        &a.engine,
                        &engine.start,
                    )
                    .await
                    {
                        return;
                    }
                    continue;
                }
            },
        };
        let outcome = supervise(&engine, &mut run, &log, &report, &mut stop, &view).await;
        if matches!(outcome, Outcome::Stop { ready: true }) && *stop.borrow() == StopMode::Drain && !run.headless {
            let t0 = Instant::now();
            drain::drain(&engine.client, &env.endpoint(run.port), env.cfg.drain_timeout, &report, &mut stop).await;
            env.metrics.engine_drained(t0.elapsed());
        }
        view.send_modify(|v| {
            // The process is going: its adapters with it.
            *v = EngineView { generation: v.generation + 1, endpoint: None, scrape: None };
        });
        let _ = env.state.remove(&replica);
        if run.port != 0 {
            env.ports.release(run.port);
        }
        if let Some((first, n)) = run.connector_ports {
            env.ports.release_block(first, n);
        }
        match outcome {
            Outcome::Stop { .. } => {
                set_state(&report, "stopping", "");
                run.id.stop(env.cfg.stop_grace).await;
                if let Proc::Child(mut c) = run.proc {
                    let _ = c.wait().await;
                }
                remove_container(&env, &a).await;
                tracing::info!(replica = %replica, pid = run.id.pid, "engine stopped");
                return set_state(&report, "stopped", "");
            }
            Outcome::Crash(reason) => {
                env.metrics.engine_crashed(&a.engine);
                run.id.signal_group(rustix::process::Signal::KILL); // leftover workers
                if let Proc::Child(mut c) = run.proc {
                    let _ = c.wait().await;
                }
                remove_container(&env, &a).await;
                if !after_crash(
                    &reason,
                    run.started_at,
                    &mut history,
                    &env,
                    &report,
                    &mut stop,
                    &mut restarts,
                    &replica,
                    &a.engine,
                    &engine.start,
                )
                .await
                {
                    return;
                }
            }
        }
    }
}

/// Member `g`'s part of its command line on this node. `head_token`: a `ray` head's own
/// gang token (a worker's comes in `g.token`).
fn gang_launch(
    env: &EngineEnv,
    g: &flotilla_api::pb::GangAssignment,
    rendezvous_port: Option<u16>,
    head_token: Option<&str>,
) -> Result<GangLaunch, String> {
    let ray = match (crate::gang::is_ray(g), &env.cfg.ray) {
        (true, Some(cfg)) => {
            let token = match head_token {
                Some(t) => t.to_string(),
                None if crate::gang::is_head(g) => return Err("a ray head has no gang token".into()),
                None if g.token.is_empty() => {
                    return Err("the assignment carries no gang token: Ray's ports would be open to anyone".into())
                }
                None => g.token.clone(),
            };
            let mut args = vec!["ray-member".to_string(), "--ray".into(), cfg.program.display().to_string()];
            args.extend(crate::gang::ray_member_args(g, &env.cfg.address, rendezvous_port)?);
            Some(crate::driver::RayLaunch { binary: cfg.member_binary.clone(), args, token })
        }
        _ => None,
    };
    Ok(GangLaunch {
        args: crate::gang::launch_args(g, &env.cfg.address, rendezvous_port)?,
        headless: !crate::gang::is_head(g),
        env: crate::gang::member_env(&env.cfg.address, env.cfg.gang_interface.as_deref()),
        vllm_args: crate::gang::vllm_member_args(g),
        ray,
    })
}

/// Downloads the model's weights, publishing progress in `report`. None: the task ends here
/// (the download failed and the task parked until told to stop, or it was told to stop).
async fn download(
    engine: &Engine,
    a: &ReplicaAssignment,
    report: &SharedReport,
    stop: &mut watch::Receiver<StopMode>,
) -> Option<PathBuf> {
    set_state(report, "downloading", "");
    engine.start.download(&a.source);
    let t0 = Instant::now();
    let progress = {
        let report = report.clone();
        let metrics = engine.env.metrics.clone();
        // (rate over the last second or more, bytes at the last report: only the bytes that
        // arrive during this download count, not a resumed file's earlier ones)
        let meter = Mutex::new((RateMeter::new(Duration::from_secs(1)), None::<u64>));
        move |p: Progress| {
            let rate = {
                let mut m = meter.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(last) = m.1 {
                    metrics.download_bytes(p.bytes.saturating_sub(last));
                }
                m.1 = Some(p.bytes);
                m.0.observe(Instant::now(), p.bytes)
            };
            update(&report, |r| {
                r.download_progress = p.fraction;
                r.download_bytes = p.bytes;
                r.download_total_bytes = p.total_bytes;
                r.download_bytes_per_second = rate.unwrap_or(0.0);
            })
        }
    };
    tokio::select! {
        r = engine.env.downloader.fetch(&a.source, &progress) => match r.inspect(|_| engine.env.metrics.downloaded(true, t0.elapsed())).inspect_err(|_| engine.env.metrics.downloaded(false, t0.elapsed())) {
            Ok(p) => {
                update(report, |r| r.download_progress = 1.0);
                Some(p)
            }
            Err(e) => {
                tracing::error!(replica = %a.replica, source = %a.source, error = %e, "model download failed");
                let why = format!("download of {} failed: {e}", a.source);
                set_state(report, "failed", &why);
                engine.start.end("failed", &why);
                park(stop, report).await;
                None
            }
        },
        _ = stop_requested(stop) => {
            set_state(report, "stopped", "");
            None
        }
    }
}

/// Records a crash and waits out the backoff. False: stop here (gave up or told to stop).
#[allow(clippy::too_many_arguments)]
async fn after_crash(
    reason: &str,
    started_at: Instant,
    history: &mut CrashHistory,
    env: &EngineEnv,
    report: &SharedReport,
    stop: &mut watch::Receiver<StopMode>,
    restarts: &mut u32,
    replica: &str,
    kind: &str,
    start: &StartTrace,
) -> bool {
    match history.on_crash(&env.cfg.restart, started_at, Instant::now()) {
        AfterCrash::GiveUp => {
            env.metrics.engine_failed(kind);
            let why = format!("crashed {} times within {:?}; last: {reason}", history.recent(), env.cfg.restart.window);
            tracing::error!(replica = %replica, reason = %why, "engine failed; not restarting");
            set_state(report, "failed", &why);
            start.end("failed", &why);
            park(stop, report).await;
            false
        }
        AfterCrash::Restart(delay) => {
            tracing::warn!(replica = %replica, reason = %reason, delay_ms = delay.as_millis() as u64, "engine crashed; restarting");
            set_state(report, "crashed", reason);
            start.attempt_failed(reason);
            update(report, |r| r.pid = 0);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {
                    *restarts += 1;
                    update(report, |r| r.restarts = *restarts);
                    true
                }
                _ = stop_requested(stop) => {
                    set_state(report, "stopped", "");
                    false
                }
            }
        }
    }
}

/// Waits for stop while keeping the current (failed) state, then reports stopped.
async fn park(stop: &mut watch::Receiver<StopMode>, report: &SharedReport) {
    stop_requested(stop).await;
    update(report, |r| r.state = "stopped".into());
}

/// Removes the replica's container, if it runs in one (`RUNTIME rm -f NAME`, bounded to 30 s;
/// a failure is logged: the next start retries, and `run --name` would say what holds it).
async fn remove_container(env: &EngineEnv, a: &ReplicaAssignment) {
    let Some(c) = env.cfg.containers.as_ref().filter(|_| !a.engine_image.is_empty()) else { return };
    let mut cmd = tokio::process::Command::new(&c.program);
    cmd.args(crate::container::remove_args(&a.replica))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match tokio::time::timeout(Duration::from_secs(30), cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => {}
        Ok(Ok(out)) => {
            tracing::warn!(replica = %a.replica, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "container removal failed")
        }
        Ok(Err(e)) => {
            tracing::warn!(replica = %a.replica, program = %c.program.display(), error = %e, "cannot run the container runtime")
        }
        Err(_) => tracing::warn!(replica = %a.replica, "container removal took over 30 s"),
    }
}

/// The agent's environment, as far as it is text (what [`crate::engine_env`] filters).
fn agent_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
}

#[allow(clippy::too_many_arguments)]
fn launch(
    engine: &Engine,
    driver: &dyn EngineDriver,
    a: &ReplicaAssignment,
    adapters: &watch::Receiver<Vec<AdapterAssignment>>,
    model_path: Option<&std::path::Path>,
    log: &LogFile,
    report: &SharedReport,
    restarts: u32,
    gang: Option<&GangLaunch>,
    rendezvous_port: Option<u16>,
) -> Result<Running, String> {
    let env = &engine.env;
    let headless = gang.is_some_and(|g| g.headless);
    let port = match headless {
        true => 0,
        false => env.ports.allocate().ok_or_else(|| format!("no free port in {:?}", env.cfg.ports))?,
    };
    let connector_ports = match &engine.connector {
        None => None,
        Some((_, plan)) if plan.ports == 0 => None,
        Some((kv, plan)) => match env.ports.allocate_block(plan.ports) {
            Some(first) => Some((first, plan.ports)),
            None => {
                env.ports.release(port);
                return Err(format!(
                    "no {} consecutive free ports in {:?} for the {} connector",
                    plan.ports,
                    env.cfg.ports,
                    kv.connector.vllm_name()
                ));
            }
        },
    };
    // Everything allocated for this start goes back when it fails.
    let release = |why: String| {
        env.ports.release(port);
        if let Some((first, n)) = connector_ports {
            env.ports.release_block(first, n);
        }
        why
    };
    let spec = LaunchSpec { assignment: a, host: &env.cfg.address, port, model_path, tls: engine.tls.as_ref(), gang };
    let mut cmd = crate::driver::member_command(driver, &spec).map_err(|e| release(e.to_string()))?;
    let mut connector_dir = None;
    if let Some((kv, plan)) = &engine.connector {
        let first_port = connector_ports.map_or(0, |(first, _)| first);
        let engine_dir = crate::engine_tls::engine_dir(&env.cfg.data_dir, &a.replica).map_err(release)?;
        let engine_id = crate::kv_transfer::engine_id(&a.replica, restarts, a.gang.is_some());
        let site = crate::kv_transfer::Site {
            replica: &a.replica,
            engine_id: &engine_id,
            address: &env.cfg.address,
            engine_port: port,
            first_port,
            engine_dir: &engine_dir,
            ucx_env: &env.cfg.ucx_env,
        };
        let connector = crate::kv_transfer::launch(kv, plan, &site);
        if !connector.files.is_empty() {
            write_connector_files(&env.cfg.data_dir, &engine_dir, &connector.files).map_err(release)?;
            connector_dir = Some(engine_dir.clone());
        }
        cmd.args.extend(connector.args);
        cmd.env.extend(connector.env);
    }
    if env.cfg.kv_events && !headless {
        // Last, so it follows the engine's own words (also those after a ray-member's `--`).
        cmd.args.extend(crate::driver::kv_events_args(&a.replica));
        if !cmd.env.iter().any(|(k, _)| k == "VLLM_HOST_IP") {
            // vLLM binds `tcp://*:0` on this address (the sim on its --host).
            cmd.env.push(("VLLM_HOST_IP".into(), env.cfg.address.clone()));
        }
    }
    let mut explicit = std::mem::take(&mut cmd.env);
    if let Some(k) = &engine.key {
        explicit.push((crate::engine_key::ENV.to_string(), k.expose().to_string()));
    }
    cmd.env = crate::engine_env::overlay(crate::engine_env::engine_env(agent_env(), &env.cfg.engine_env), &explicit);
    if let (false, Some(c)) = (a.engine_image.is_empty(), &env.cfg.containers) {
        let tls_dir = engine.tls.as_ref().and_then(|t| t.cert.parent());
        let mut mounts: Vec<&std::path::Path> = model_path.into_iter().chain(tls_dir).collect();
        if let Some(d) = connector_dir.as_deref().filter(|d| Some(*d) != tls_dir) {
            mounts.push(d);
        }
        cmd = crate::container::wrap(c, cmd, &a.engine_image, &a.replica, &a.gpus, &mounts);
    }
    let (child, id) =
        process::spawn(&cmd, &log.path).map_err(|e| release(format!("cannot start {}: {e}", cmd.program.display())))?;
    let mut assignment: crate::state::SavedAssignment = a.into();
    assignment.adapters = crate::state::saved_adapters(&adapters.borrow());
    let api_key = engine.key.as_ref().map(|k| k.expose().to_string());
    let engine_cert_sha256 = engine.tls.as_ref().map(|t| t.pin.hex());
    // A head's own token, to report it again when adopted (a worker's is in its assignment).
    let gang_token = gang.filter(|g| !g.headless).and_then(|g| g.ray.as_ref()).map(|r| r.token.clone());
    let saved = SavedEngine {
        assignment,
        process: id,
        port,
        restarts,
        api_key,
        engine_cert_sha256,
        rendezvous_port,
        gang_token,
        connector_ports,
    };
    if let Err(e) = env.state.put(saved) {
        tracing::error!(replica = %a.replica, error = %e, "cannot record engine in the state file; a restarted agent will not adopt it");
    }
    tracing::info!(replica = %a.replica, pid = id.pid, port, command = %cmd.display(), "engine started");
    env.metrics.engine_started(&a.engine);
    update(report, |r| {
        r.state = "starting".into();
        r.reason.clear();
        r.pid = id.pid;
        r.endpoint = if headless { String::new() } else { env.endpoint(port) };
        r.num_requests_running = 0.0;
        r.num_requests_waiting = 0.0;
        r.kv_cache_usage = 0.0;
        // A new process: its counters restart and nothing is known until it is scraped.
        r.generation_tokens_total = 0.0;
        r.prompt_tokens_total = 0.0;
        r.requests_finished_total = 0.0;
        r.metrics_known = false;
    });
    Ok(Running { proc: Proc::Child(child), id, port, started_at: Instant::now(), headless, connector_ports })
}

/// Writes a connector's files (LMCache's config) into the engine's private directory.
fn write_connector_files(
    data_dir: &std::path::Path,
    engine_dir: &std::path::Path,
    files: &[(PathBuf, String)],
) -> Result<(), String> {
    for d in [data_dir.join("engines"), engine_dir.to_path_buf()] {
        flotilla_security::private_dir::ensure(&d).map_err(|e| format!("cannot make {}: {e}", d.display()))?;
    }
    for (path, text) in files {
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// A gang head's rendezvous port, reported as `rendezvous` while held, and for a `ray`
/// head its gang token (`gang_token`); released (and no longer reported) when dropped,
/// with the engine task.
struct Rendezvous {
    env: Arc<EngineEnv>,
    report: SharedReport,
    port: u16,
    /// A `ray` head's secret for its gang: Ray's auth token.
    token: Option<String>,
}

impl Rendezvous {
    /// Reserves `adopted` (the port an adopted head was started with) or allocates one, and
    /// for a `ray` head keeps the adopted token or makes one; None when the range has no
    /// free port (or the random source failed).
    fn hold(
        env: &Arc<EngineEnv>,
        report: &SharedReport,
        adopted: Option<&SavedEngine>,
        ray: bool,
    ) -> Option<Rendezvous> {
        let token = match (ray, adopted.and_then(|s| s.gang_token.clone())) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => Some(crate::engine_key::generate().ok()?.expose().to_string()),
        };
        let port = match adopted.and_then(|s| s.rendezvous_port) {
            Some(p) => {
                env.ports.reserve(p);
                p
            }
            None => env.ports.allocate()?,
        };
        update(report, |r| {
            r.rendezvous = env.endpoint(port);
            r.gang_token = token.clone().unwrap_or_default();
        });
        // The workers wait for it: tell the leader now.
        env.early_heartbeat.notify_one();
        Some(Rendezvous { env: env.clone(), report: report.clone(), port, token })
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        self.env.ports.release(self.port);
        update(&self.report, |r| {
            r.rendezvous.clear();
            r.gang_token.clear();
        });
    }
}

/// How the process of `run` ended.
async fn exited(run: &mut Running) -> String {
    match &mut run.proc {
        Proc::Child(c) => match c.wait().await {
            Ok(status) => process::describe_exit(status),
            Err(e) => format!("wait failed: {e}"),
        },
        Proc::Adopted => {
            while run.id.is_alive() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            "adopted engine process exited (status unknown)".to_string()
        }
    }
}

/// Watches a headless gang worker: no `/health` to ask, so it is ready once it has run
/// [`crate::gang::WORKER_SETTLE`]; its exit is a crash.
async fn supervise_headless(
    engine: &Engine,
    run: &mut Running,
    log: &LogFile,
    report: &SharedReport,
    stop: &mut watch::Receiver<StopMode>,
) -> Outcome {
    let env = &engine.env;
    let settled = tokio::time::sleep_until(run.started_at + crate::gang::WORKER_SETTLE);
    tokio::pin!(settled);
    let mut ready = false;
    let mut rotate = tokio::time::interval(env.cfg.heartbeat_interval.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = stop_requested(stop) => return Outcome::Stop { ready },
            desc = exited(run) => {
                let last = log.last_line().map(|l| format!("; last log line: {l}")).unwrap_or_default();
                return Outcome::Crash(format!("{desc}{last}"));
            }
            () = &mut settled, if !ready => {
                ready = true;
                tracing::info!(replica = %report_name(report), pid = run.id.pid, "headless gang worker running; ready");
                if matches!(run.proc, Proc::Child(_)) {
                    env.metrics.engine_ready(&engine.kind, run.started_at.elapsed());
                }
                set_state(report, "ready", "");
                engine.start.end("ready", "");
                env.early_heartbeat.notify_one();
            }
            _ = rotate.tick() => {
                let rot = log.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || rot.rotate_if_needed()).await {
                    tracing::warn!(path = %log.path.display(), error = %e, "log rotation failed");
                }
            }
        }
    }
}

/// Watches a running engine until it exits, must be stopped, or misses its start deadline.
async fn supervise(
    engine: &Engine,
    run: &mut Running,
    log: &LogFile,
    report: &SharedReport,
    stop: &mut watch::Receiver<StopMode>,
    view: &watch::Sender<EngineView>,
) -> Outcome {
    if run.headless {
        return supervise_headless(engine, run, log, report, stop).await;
    }
    let env = &engine.env;
    let endpoint = env.endpoint(run.port);
    let deadline = run.started_at + env.cfg.start_timeout;
    let mut ready = false;
    let mut unhealthy_since: Option<Instant> = None;
    let mut stall = super::stall::StallWatch::default();
    let mut next_probe = Duration::ZERO;
    loop {
        let exited = exited(run);
        let probe = async {
            tokio::time::sleep(next_probe).await;
            crate::probe::healthy(&engine.client, &endpoint).await
        };
        let healthy = tokio::select! {
            _ = stop_requested(stop) => return Outcome::Stop { ready },
            desc = exited => {
                let last = log.last_line().map(|l| format!("; last log line: {l}")).unwrap_or_default();
                return Outcome::Crash(format!("{desc}{last}"));
            }
            ok = probe => ok,
        };
        if !ready {
            if healthy {
                ready = true;
                tracing::info!(replica = %report_name(report), endpoint = %endpoint, "engine ready");
                if matches!(run.proc, Proc::Child(_)) {
                    env.metrics.engine_ready(&engine.kind, run.started_at.elapsed());
                }
                set_state(report, "ready", "");
                engine.start.end("ready", "");
                view.send_modify(|v| v.endpoint = Some(endpoint.clone()));
                // Tell the leader now, not at the next heartbeat: a replacement for a lost
                // node or a rollout step waits on this Ready.
                env.early_heartbeat.notify_one();
            } else if Instant::now() >= deadline {
                run.id.stop(env.cfg.stop_grace).await;
                return Outcome::Crash(format!("not healthy within {:?} of starting", env.cfg.start_timeout));
            }
            next_probe = Duration::from_millis(100);
            continue;
        }
        if !healthy {
            let since = *unhealthy_since.get_or_insert_with(Instant::now);
            let failing = since.elapsed();
            if failing >= env.cfg.liveness_timeout {
                run.id.stop(env.cfg.stop_grace).await;
                return Outcome::Crash(format!("/health failing for {failing:?}; killed"));
            }
            if failing >= env.cfg.heartbeat_interval * 3 {
                set_state(report, "starting", &format!("/health failing for {}s", failing.as_secs()));
            }
            next_probe = env.cfg.heartbeat_interval;
            continue;
        }
        if unhealthy_since.take().is_some() {
            set_state(report, "ready", "");
        }
        let started = Instant::now();
        let scrape = crate::probe::scrape(&engine.client, &endpoint).await;
        update(report, |r| crate::probe::apply(&scrape, r));
        if let Some(m) = scrape.metrics.as_ref().filter(|m| m.is_known()) {
            let tokens = m.generation_tokens + m.prompt_tokens;
            if let Some(t) = stall.observe(m.running, tokens, Instant::now(), env.cfg.stall_timeout) {
                run.id.stop(env.cfg.stop_grace).await;
                return Outcome::Crash(format!(
                    "stalled: {} running requests and no new tokens for {t:?}; killed",
                    m.running
                ));
            }
        }
        if let Some(names) = scrape.adapters {
            // The adapter worker owns `loaded_adapters` (it merges scrapes with its results).
            view.send_modify(|v| v.scrape = Some((started, names)));
        }
        let rot = log.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || rot.rotate_if_needed()).await {
            tracing::warn!(path = %log.path.display(), error = %e, "log rotation failed");
        }
        next_probe = env.cfg.heartbeat_interval;
    }
}

fn report_name(report: &SharedReport) -> String {
    report.lock().unwrap_or_else(|p| p.into_inner()).replica.clone()
}
