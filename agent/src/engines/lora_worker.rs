//! The adapter worker of one engine task: keeps the engine's LoRA adapters equal to the
//! assigned list. It runs beside the engine's life cycle (in the same task) and acts only
//! while the engine process is up and has been ready. Each event (a new list, a new
//! engine view, a finished call) runs the pure [`crate::lora_plan::decide`], starts its
//! steps, and rewrites the report's `adapters` and `loaded_adapters`.
//!
//! ```text
//!  Slot ──watch: desired list──┐                 ┌──> fetch (Downloader) ─> load_lora
//!  engine life ──watch: view───┼──> Worker ─decide┤                         (≤ 4 at once)
//!   (endpoint, process         │    (tracked,     └──> unload_lora
//!    generation, scrapes)      │     load_ms)  ──> report.adapters / loaded_adapters
//!                              └─ finished load or failure ──> early heartbeat
//! ```
//!
//! A new engine process (a restart after a crash) clears the tracked state: everything
//! desired is loaded again, failed adapters included. An adopted engine's adapters are
//! known from its first `/v1/models` scrape; the saved list says which source each was
//! loaded from.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use flotilla_api::pb::AdapterAssignment;
use flotilla_engine::{EngineClient, EngineError};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::watch;
use tokio::time::Instant;

use super::engine::SharedReport;
use super::EngineEnv;
use crate::lora_plan::{decide, merge_scrape, report, Phase, Step, Tracked, MAX_CONCURRENT_LOADS};

/// What the engine's life cycle tells the worker.
#[derive(Debug, Clone, Default)]
pub struct EngineView {
    /// Bumped each time an engine process ends; a new one starts with no adapters.
    pub generation: u64,
    /// `host:port` once the current process has been ready; None while there is none.
    pub endpoint: Option<String>,
    /// The last successful `/v1/models` scrape of this process: when it started, and the
    /// adapter ids it listed.
    pub scrape: Option<(Instant, Vec<String>)>,
}

/// A finished call.
enum Done {
    Fetched { name: String, source: String, started: Instant, path: Result<String, String> },
    Loaded { name: String, source: String, started: Instant, result: Result<(), EngineError> },
    Unloaded { name: String, result: Result<(), EngineError> },
}

/// One engine's adapter worker.
pub struct Worker {
    env: Arc<EngineEnv>,
    /// The engine's client, carrying its API key (LoRA calls are under `/v1`).
    client: EngineClient,
    replica: String,
    report: SharedReport,
    desired: Vec<AdapterAssignment>,
    generation: u64,
    endpoint: Option<String>,
    /// Adapter ids the engine holds: the last scrape merged with newer local results.
    engine: Vec<String>,
    /// False until the engine's adapters are known (an adopted engine before its scrape).
    known: bool,
    tracked: BTreeMap<String, Tracked>,
    /// When each name's last load or unload finished (see [`merge_scrape`]).
    touched: BTreeMap<String, Instant>,
    /// Milliseconds of the last successful load, per name.
    load_ms: BTreeMap<String, u64>,
    calls: FuturesUnordered<BoxFuture<'static, Done>>,
}

impl Worker {
    /// A worker for `replica` whose engine starts with `desired`, calling it through
    /// `client`. `adopted`: the process was started by a previous agent with these adapters
    /// (their sources are assumed for the ones its first scrape lists).
    pub fn new(
        env: Arc<EngineEnv>,
        client: EngineClient,
        replica: &str,
        report: SharedReport,
        desired: Vec<AdapterAssignment>,
        adopted: bool,
    ) -> Self {
        let tracked = if adopted {
            desired.iter().map(|a| (a.name.clone(), Tracked::new(&a.source, Phase::Loaded))).collect()
        } else {
            BTreeMap::new()
        };
        Worker {
            env,
            client,
            replica: replica.to_string(),
            report,
            desired,
            generation: 0,
            endpoint: None,
            engine: Vec::new(),
            known: !adopted,
            tracked,
            touched: BTreeMap::new(),
            load_ms: BTreeMap::new(),
            calls: FuturesUnordered::new(),
        }
    }

    /// Runs until the engine's life cycle drops its view sender (the engine task ends).
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Vec<AdapterAssignment>>,
        mut view: watch::Receiver<EngineView>,
    ) {
        let mut desired_open = true;
        self.publish();
        loop {
            let mut finished = false;
            tokio::select! {
                r = desired.changed(), if desired_open => match r {
                    Ok(()) => {
                        self.desired = desired.borrow_and_update().clone();
                        if let Err(e) = self.env.state.set_adapters(&self.replica, &self.desired) {
                            tracing::error!(replica = %self.replica, error = %e, "cannot record adapters in the state file");
                        }
                    }
                    // The slot is gone; the engine task is ending. Keep the last list.
                    Err(_) => desired_open = false,
                },
                r = view.changed() => match r {
                    Ok(()) => {
                        let v = view.borrow_and_update().clone();
                        self.on_view(v);
                    }
                    Err(_) => return,
                },
                Some(done) = self.calls.next(), if !self.calls.is_empty() => finished = self.on_done(done),
            }
            self.step();
            self.publish();
            if finished {
                // Cold-load latency is measured at the control plane: tell it now.
                self.env.early_heartbeat.notify_one();
            }
        }
    }

    fn on_view(&mut self, v: EngineView) {
        if v.generation != self.generation {
            // The process ended: its adapters and our calls to it are gone.
            self.generation = v.generation;
            self.calls = FuturesUnordered::new();
            self.tracked.clear();
            self.touched.clear();
            self.engine.clear();
            self.known = true;
        }
        self.endpoint = v.endpoint;
        if let Some((started, names)) = &v.scrape {
            self.engine = merge_scrape(&self.engine, names, *started, &self.touched);
            self.known = true;
        }
    }

    /// Records a finished call. True when a load ended (loaded or failed).
    fn on_done(&mut self, done: Done) -> bool {
        let replica = self.replica.clone();
        match done {
            Done::Fetched { name, source, started, path: Ok(path) } => {
                self.tracked.insert(name.clone(), Tracked::new(&source, Phase::Loading));
                self.start_load(name, source, path, started);
                false
            }
            Done::Fetched { name, source, path: Err(reason), .. } => {
                self.env.metrics.adapter_loaded(false, std::time::Duration::ZERO);
                tracing::warn!(replica = %replica, adapter = %name, source = %source, reason = %reason, "adapter download failed");
                self.tracked.insert(name, Tracked::new(&source, Phase::Failed(reason)));
                true
            }
            Done::Loaded { name, source, started, result } => {
                let now = Instant::now();
                match result {
                    Err(e) if !already_loaded(&e) => {
                        self.env.metrics.adapter_loaded(false, now.duration_since(started));
                        let reason = format!("load of {source} failed: {e}");
                        tracing::warn!(replica = %replica, adapter = %name, reason = %reason, "adapter load failed");
                        self.tracked.insert(name, Tracked::new(&source, Phase::Failed(reason)));
                    }
                    _ => {
                        self.env.metrics.adapter_loaded(true, now.duration_since(started));
                        let ms = now.duration_since(started).as_millis() as u64;
                        tracing::info!(replica = %replica, adapter = %name, source = %source, load_ms = ms, "adapter loaded");
                        self.load_ms.insert(name.clone(), ms);
                        self.tracked.insert(name.clone(), Tracked::new(&source, Phase::Loaded));
                        if !self.engine.contains(&name) {
                            self.engine.push(name.clone());
                        }
                        self.touched.insert(name, now);
                    }
                }
                true
            }
            Done::Unloaded { name, result } => {
                let now = Instant::now();
                let wanted = self.desired.iter().find(|a| a.name == name).map(|a| a.source.clone());
                let unloaded = matches!(result, Ok(()) | Err(EngineError::Http { status: 404, .. }));
                self.env.metrics.adapter_unloaded(unloaded);
                match result {
                    Ok(()) | Err(EngineError::Http { status: 404, .. }) => {
                        tracing::info!(replica = %replica, adapter = %name, "adapter unloaded");
                        self.tracked.remove(&name);
                        self.engine.retain(|n| *n != name);
                    }
                    Err(e) => match wanted {
                        // A new source for the name: the old version stays; fail the new one
                        // rather than serve the old one under its name.
                        Some(source) => {
                            let reason = format!("cannot unload the previous version: {e}");
                            tracing::warn!(replica = %replica, adapter = %name, reason = %reason, "adapter unload failed");
                            self.tracked.insert(name.clone(), Tracked::new(&source, Phase::Failed(reason)));
                        }
                        // Retried once a newer scrape still lists it.
                        None => {
                            tracing::warn!(replica = %replica, adapter = %name, error = %e, "adapter unload failed; retrying after the next scrape");
                            self.tracked.remove(&name);
                            self.engine.retain(|n| *n != name);
                        }
                    },
                }
                self.touched.insert(name, now);
                false
            }
        }
    }

    /// Starts what the decision asks for (only while the engine is up and known).
    fn step(&mut self) {
        let Some(endpoint) = self.endpoint.clone() else { return };
        if !self.known {
            return;
        }
        let held: BTreeSet<String> = self.engine.iter().cloned().collect();
        for step in decide(&self.desired, &held, &self.tracked, MAX_CONCURRENT_LOADS) {
            match step {
                Step::Load { name, source } => {
                    tracing::info!(replica = %self.replica, adapter = %name, source = %source, "loading adapter");
                    let started = Instant::now();
                    if source.starts_with("sim://") {
                        // Synthetic adapters of sim engines: the source is the path.
                        self.tracked.insert(name.clone(), Tracked::new(&source, Phase::Loading));
                        self.start_load(name, source.clone(), source, started);
                    } else {
                        self.tracked.insert(name.clone(), Tracked::new(&source, Phase::Downloading));
                        let downloader = self.env.downloader.clone();
                        self.calls.push(Box::pin(async move {
                            let path = downloader
                                .fetch(&source, &|_| {})
                                .await
                                .map(|p| p.display().to_string())
                                .map_err(|e| format!("download of {source} failed: {e}"));
                            Done::Fetched { name, source, started, path }
                        }));
                    }
                }
                Step::Unload { name } => {
                    tracing::info!(replica = %self.replica, adapter = %name, "unloading adapter");
                    let old = self.tracked.get(&name).map(|t| t.source.clone()).unwrap_or_default();
                    self.tracked.insert(name.clone(), Tracked::new(&old, Phase::Unloading));
                    let (client, endpoint) = (self.client.clone(), endpoint.clone());
                    self.calls.push(Box::pin(async move {
                        let result = client.unload_lora(&endpoint, &name).await;
                        Done::Unloaded { name, result }
                    }));
                }
                Step::Adopt { name, source } => {
                    tracing::info!(replica = %self.replica, adapter = %name, source = %source, "engine already holds adapter");
                    self.tracked.insert(name, Tracked::new(&source, Phase::Loaded));
                }
                Step::Forget { name } => {
                    self.tracked.remove(&name);
                }
            }
        }
    }

    fn start_load(&mut self, name: String, source: String, path: String, started: Instant) {
        let Some(endpoint) = self.endpoint.clone() else { return };
        let client = self.client.clone();
        self.calls.push(Box::pin(async move {
            let result = client.load_lora(&endpoint, &name, &path).await;
            Done::Loaded { name, source, started, result }
        }));
    }

    /// Writes the report's adapter fields.
    fn publish(&mut self) {
        let desired = &self.desired;
        self.load_ms.retain(|name, _| desired.iter().any(|a| a.name == *name));
        let adapters = report(&self.desired, &self.tracked, &self.load_ms);
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        r.adapters = adapters;
        if self.known {
            r.loaded_adapters.clone_from(&self.engine);
        }
    }
}

/// vLLM answers a name loaded twice with 400 "... has already been loaded ...": the engine
/// holds it, which is what was asked.
fn already_loaded(e: &EngineError) -> bool {
    matches!(e, EngineError::Http { status: 400, message, .. } if message.contains("already been loaded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_load_of_a_name_counts_as_loaded() {
        let http = |status, message: &str| EngineError::Http { url: "u".into(), status, message: message.into() };
        assert!(already_loaded(&http(
            400,
            "The lora adapter 'a' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."
        )));
        assert!(!already_loaded(&http(400, "Both 'lora_name' and 'lora_path' must be provided.")));
        assert!(!already_loaded(&http(500, "has already been loaded")));
    }
}
