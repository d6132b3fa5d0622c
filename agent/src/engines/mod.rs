//! The engines this agent runs: the [`EngineManager`] keeps one task per assigned replica (see
//! [`engine`]), applies each `Assign` through the pure [`crate::reconcile`] decision,
//! adopts engines a previous agent left running, and collects the reports heartbeats send.
//! A change of adapters only goes to the running engine task (watch channel), which loads
//! and unloads them through the engine API ([`lora_worker`]); it never restarts the engine.
//!
//! ```text
//!  Assign ──> EngineManager::apply ──reconcile──> Start / Stop (drain first) / Replace / UpdateAdapters / Keep
//!                   │                                  │
//!                   └── slots: replica -> engine task ─┴─> child process (own group)
//!                                 │  └── adapter worker ──> load/unload_lora
//!                                 └──> SharedReport ──> heartbeat (early after adapter loads)
//! ```

pub mod backoff;
pub mod drain;
pub mod engine;
pub mod logs;
pub mod lora_worker;
pub mod ports;
pub mod process;
pub mod stall;
pub mod start_trace;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_api::pb::{AdapterAssignment, EngineReport, ReplicaAssignment};
use flotilla_engine::EngineClient;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::download::Downloader;
use crate::driver::{SimDriver, VllmDriver};
use crate::reconcile::{reconcile, Action};
use crate::state::StateStore;
use drain::StopMode;
use engine::SharedReport;

/// What every engine task shares.
#[derive(Debug)]
pub struct EngineEnv {
    /// Agent config.
    pub cfg: Arc<AgentConfig>,
    /// `engine: sim`.
    pub sim: SimDriver,
    /// `engine: vllm`.
    pub vllm: VllmDriver,
    /// Engine client without a key; each engine task derives one that sends its engine's
    /// key (`EngineClient::with_key`) for its probes and LoRA calls.
    pub engine: EngineClient,
    /// Model cache.
    pub downloader: Arc<Downloader>,
    /// Engines state file.
    pub state: Arc<StateStore>,
    /// Port pool.
    pub ports: ports::Ports,
    /// `<data-dir>/logs`.
    pub log_dir: PathBuf,
    /// Asks the connection loop for a heartbeat now (an engine turned ready, an adapter
    /// finished loading or failed); it sends one, rate-limited.
    pub early_heartbeat: Arc<Notify>,
    /// The agent's metrics.
    pub metrics: Arc<crate::metrics::AgentMetrics>,
}

impl EngineEnv {
    /// `host:port` of the engine listening on `port` (the agent's `--address`; an IPv6
    /// address in brackets).
    pub fn endpoint(&self, port: u16) -> String {
        match self.cfg.address.contains(':') {
            true => format!("[{}]:{port}", self.cfg.address),
            false => format!("{}:{port}", self.cfg.address),
        }
    }
}

struct Slot {
    assignment: ReplicaAssignment,
    report: SharedReport,
    stop: watch::Sender<StopMode>,
    /// The adapter list the engine must hold.
    adapters: watch::Sender<Vec<AdapterAssignment>>,
    task: JoinHandle<()>,
}

/// Owns the engine tasks.
pub struct EngineManager {
    env: Arc<EngineEnv>,
    slots: Mutex<BTreeMap<String, Slot>>,
    /// Engines being stopped (reported as `stopping` until their task ends).
    stopping: Mutex<Vec<Slot>>,
}

impl EngineManager {
    /// A manager with no engines.
    pub fn new(env: Arc<EngineEnv>) -> Self {
        EngineManager { env, slots: Mutex::default(), stopping: Mutex::default() }
    }

    /// The keyless client the engine tasks derive theirs from: enough for `/health` and
    /// `/metrics`, not for an engine's `/v1` API (which needs the engine's key).
    pub fn engine_client(&self) -> &EngineClient {
        &self.env.engine
    }

    /// Adopts the engines of the state file whose processes are still alive (same pid and
    /// start time); forgets the dead ones. Call once, before the first [`Self::apply`].
    pub fn adopt(&self) -> usize {
        let mut adopted = 0;
        for (replica, saved) in self.env.state.engines() {
            if !saved.process.is_alive() {
                tracing::info!(replica = %replica, pid = saved.process.pid, "engine from a previous run is gone");
                let _ = self.env.state.remove(&replica);
                continue;
            }
            let assignment: ReplicaAssignment = saved.assignment.clone().into();
            self.spawn_slot(assignment, Some(saved), None);
            adopted += 1;
        }
        adopted
    }

    fn spawn_slot(
        &self,
        assignment: ReplicaAssignment,
        adopted: Option<crate::state::SavedEngine>,
        after: Option<JoinHandle<()>>,
    ) {
        let report: SharedReport = Arc::new(Mutex::new(EngineReport {
            replica: assignment.replica.clone(),
            state: "starting".into(),
            ..Default::default()
        }));
        let (stop, stop_rx) = watch::channel(StopMode::Run);
        let (adapters, adapters_rx) = watch::channel(assignment.adapters.clone());
        let env = self.env.clone();
        let task_report = report.clone();
        let a = assignment.clone();
        let task = tokio::spawn(async move {
            if let Some(prev) = after {
                let _ = prev.await; // the previous engine of this replica must be gone first
            }
            engine::run(env, a, task_report, stop_rx, adopted, adapters_rx).await;
        });
        let name = assignment.replica.clone();
        let slot = Slot { assignment, report, stop, adapters, task };
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).insert(name, slot);
    }

    /// Reconciles toward `desired` (the full set of an `Assign`).
    pub fn apply(&self, desired: &[ReplicaAssignment]) {
        let actual: BTreeMap<String, ReplicaAssignment> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, s)| (k.clone(), s.assignment.clone()))
            .collect();
        for action in reconcile(desired, &actual) {
            match action {
                Action::Keep(_) => {}
                Action::Start(a) => {
                    tracing::info!(replica = %a.replica, model = %a.model, engine = %a.engine, gpus = ?a.gpus, "starting engine");
                    let prev = self.take_stopping(&a.replica);
                    self.spawn_slot(a, None, prev);
                }
                Action::Stop(name) => {
                    tracing::info!(replica = %name, "draining and stopping engine (no longer assigned)");
                    self.stop_slot(&name, StopMode::Drain);
                }
                Action::UpdateAdapters(a) => {
                    let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(slot) = slots.get_mut(&a.replica) {
                        let names: Vec<&str> = a.adapters.iter().map(|x| x.name.as_str()).collect();
                        tracing::info!(replica = %a.replica, adapters = ?names, "adapters changed; engine kept");
                        slot.adapters.send_replace(a.adapters.clone());
                        slot.assignment = a;
                    }
                }
                Action::Replace(a) => {
                    tracing::info!(replica = %a.replica, "assignment changed; replacing engine");
                    // Same replica, new engine: the replica stays routable, so a drain
                    // would only wait for the timeout.
                    self.stop_slot(&a.replica, StopMode::Now);
                    let prev = self.take_stopping(&a.replica);
                    self.spawn_slot(a, None, prev);
                }
            }
        }
    }

    fn stop_slot(&self, name: &str, mode: StopMode) {
        let slot = self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        if let Some(slot) = slot {
            let _ = slot.stop.send(mode);
            self.stopping.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
        }
    }

    /// The stop task of `replica`, if one is in progress, so a new start can wait for it.
    fn take_stopping(&self, replica: &str) -> Option<JoinHandle<()>> {
        let mut stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
        let i = stopping.iter().position(|s| s.assignment.replica == replica)?;
        Some(stopping.swap_remove(i).task)
    }

    /// Resolves when an engine task asks for an early heartbeat (a permit is kept if nobody
    /// waits, so a request made between two waits is not lost).
    pub async fn heartbeat_wanted(&self) {
        self.env.early_heartbeat.notified().await;
    }

    /// Reports of every engine, stopping ones included.
    pub fn reports(&self) -> Vec<EngineReport> {
        let mut out: Vec<EngineReport> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| s.report.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        let mut stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
        stopping.retain(|s| !s.task.is_finished());
        out.extend(stopping.iter().map(|s| {
            let mut r = s.report.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if r.state != "draining" {
                r.state = "stopping".into();
            }
            r
        }));
        out
    }

    /// Ends every engine task. `stop_engines`: stop the processes too (waiting at most the
    /// grace period plus 5 s); otherwise leave them running for the next agent to adopt.
    pub async fn shutdown(&self, stop_engines: bool) {
        let active: Vec<Slot> =
            std::mem::take(&mut *self.slots.lock().unwrap_or_else(|p| p.into_inner())).into_values().collect();
        // Engines already being stopped (unassigned) finish stopping either way.
        let mut slots: Vec<Slot> = std::mem::take(&mut *self.stopping.lock().unwrap_or_else(|p| p.into_inner()));
        if stop_engines {
            slots.extend(active);
        } else {
            let n = active.len();
            for s in active {
                // The task must be gone before its stop sender is: a task that saw the sender
                // dropped would take it for "stop" and SIGTERM the engine it is to leave
                // running (and forget it in the state file). Under load a test caught exactly
                // that: an adopted engine dying right after a restart.
                let Slot { task, stop, .. } = s;
                task.abort();
                let _ = task.await;
                drop(stop);
            }
            tracing::info!(engines = n, "agent exiting; engines left running for adoption");
        }
        for s in &slots {
            let _ = s.stop.send(StopMode::Now); // cuts drains short too
        }
        let limit = self.env.cfg.stop_grace + Duration::from_secs(5);
        for s in slots {
            let abort = s.task.abort_handle();
            if tokio::time::timeout(limit, s.task).await.is_err() {
                abort.abort();
                tracing::warn!(replica = %s.assignment.replica, "engine did not stop in time");
            }
        }
        if stop_engines {
            tracing::info!("all engines stopped");
        }
    }
}
