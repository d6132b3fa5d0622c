//! `flotilla agent`: the node daemon (issue 5). Registers the node and its GPUs with the
//! leader, holds a heartbeat stream to it, and runs the engines it is assigned.
//!
//! ```text
//!  config (AgentArgs -> AgentConfig)      gpu (SimulatedGpus | NvmlGpus) → signals
//!        │                                     │ GpuMonitor: classify (pure) with history
//!  connection ──Register/Heartbeat──> leader   │ probe per heartbeat
//!        │ <────────Assign──────────           │
//!        v                                     v
//!  engines::EngineManager ──reconcile (pure)──> engine tasks ──> child processes
//!        │                         engine_policy (pure) checks the Model's engine_args
//!        │                         driver (sim | vllm) builds each command line
//!        │                         kv_transfer (pure) → a P/D member's connector args, env, file
//!        │                         engine_env (pure) → its environment; engine_key → its API key
//!        │                         engine_tls → its pinned self-signed certificate (--engine-tls)
//!        │                         lora_plan (pure) → per-engine LoRA worker: load/unload
//!        ├── download (model and adapter cache)   probe (/health, /metrics, /v1/models)
//!        │     └── source_policy (pure) checks each source, redirect, address and size
//!        └── state (engines.json: adopt engines across agent restarts)
//! ```
//!
//! Entry points: [`run`] for the `flotilla agent` subcommand (until SIGINT/SIGTERM),
//! [`start`] for in-process use (`flotilla dev`, tests).
#![forbid(unsafe_code)]

pub mod config;
pub mod connection;
pub mod container;
pub mod download;
pub mod driver;
pub mod engine_env;
pub mod engine_key;
pub mod engine_policy;
pub mod engine_tls;
pub mod engines;
pub mod error;
pub mod gang;
pub mod gpu;
pub mod http;
pub mod kv_transfer;
pub mod lora_plan;
pub mod metrics;
pub mod probe;
pub mod ray_member;
pub mod reconcile;
pub mod source_policy;
pub mod state;

use std::sync::Arc;

use flotilla_api::pb::EngineReport;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The engine client crate (health, standardized metrics, models, LoRA calls).
pub use flotilla_engine as engine;

pub use config::{AgentArgs, AgentConfig};
pub use error::AgentError;
pub use gpu::{GpuInventory, SimulatedGpus};

use engines::{EngineEnv, EngineManager};

/// A running agent started by [`start`].
pub struct AgentHandle {
    cfg: Arc<AgentConfig>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), AgentError>>>,
    manager: Arc<EngineManager>,
    downloader: Arc<download::Downloader>,
    gpus: Arc<dyn GpuInventory>,
    /// Where `/metrics` is served (`--metrics-listen`, its port resolved).
    metrics_addr: Option<std::net::SocketAddr>,
    /// Held for the agent's lifetime: one agent per data dir.
    _lock: std::fs::File,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle").field("node", &self.cfg.node_name).finish()
    }
}

impl AgentHandle {
    /// The validated config.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Downloads refused by the source policy so far, by rule (every rule, zeros included).
    pub fn download_refusals(&self) -> Vec<(&'static str, u64)> {
        self.downloader.guard().refusals()
    }

    /// The address `/metrics` is served on, when `--metrics-listen` was given.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// Current engine reports (what the next heartbeat carries).
    pub fn reports(&self) -> Vec<EngineReport> {
        self.manager.reports()
    }

    /// A keyless client for this node's engines (`/health`, `/metrics`).
    pub fn engine_client(&self) -> &flotilla_engine::EngineClient {
        self.manager.engine_client()
    }

    /// The GPU inventory.
    pub fn gpus(&self) -> Arc<dyn GpuInventory> {
        self.gpus.clone()
    }

    /// Waits until the connection loop ends by itself: only on a fatal refusal (Err).
    pub async fn wait(&mut self) -> Result<(), AgentError> {
        match self.task.as_mut() {
            Some(t) => {
                let r = t.await.unwrap_or_else(|e| Err(AgentError::Internal(format!("connection task ended: {e}"))));
                self.task = None;
                r
            }
            None => Ok(()),
        }
    }

    /// Disconnects and ends the engine tasks. `stop_engines`: stop every engine process
    /// too; otherwise they keep running and the next agent on this data dir adopts them.
    pub async fn shutdown(mut self, stop_engines: bool) -> Result<(), AgentError> {
        let _ = self.shutdown.send(true);
        let r = self.wait().await;
        self.manager.shutdown(stop_engines).await;
        r
    }
}

/// Validates `args`, prepares the data dir, adopts engines left by a previous run, and
/// starts connecting. Returns at once.
pub async fn start(args: AgentArgs) -> Result<AgentHandle, AgentError> {
    let cfg = args.validate()?;
    let gpus = gpu::from_source(&cfg.gpus, cfg.gpu_faults.as_deref())?;
    start_with_gpus(cfg, gpus).await
}

/// [`start`] with a validated config and a given GPU inventory (tests inject failures).
/// Its probes are classified with history ([`gpu::GpuMonitor`]).
pub async fn start_with_gpus(cfg: AgentConfig, gpus: Arc<dyn GpuInventory>) -> Result<AgentHandle, AgentError> {
    let gpus: Arc<dyn GpuInventory> = Arc::new(gpu::GpuMonitor::new(gpus, gpu::classify::HealthPolicy::default()));
    let cfg = Arc::new(cfg);
    let log_dir = cfg.data_dir.join("logs");
    let models = cfg.data_dir.join("models");
    for dir in [&cfg.data_dir, &log_dir, &models] {
        flotilla_security::private_dir::ensure(dir).map_err(|e| AgentError::io(dir, e))?;
    }
    let lock = state::lock_data_dir(&cfg.data_dir)?;
    let agent_id = state::agent_id(&cfg.data_dir)?;
    let store = Arc::new(state::StateStore::load(&cfg.data_dir)?);
    let http =
        http::HttpClient::guarded(cfg.source_policy.clone()).map_err(|e| AgentError::invalid("hf-endpoint", e))?;
    let s3 = download::s3::S3Config::from_env(&cfg.s3_endpoint);
    let downloader = Arc::new(download::Downloader::new(models, http, &cfg.hf_endpoint, s3, cfg.source_policy.clone()));
    let metrics = Arc::new(metrics::AgentMetrics::default());
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let env = Arc::new(EngineEnv {
        sim: driver::SimDriver {
            binary: cfg.sim_binary.clone(),
            subcommand: cfg.sim_subcommand.clone(),
            extra_args: cfg.sim_args.clone(),
        },
        vllm: driver::VllmDriver { template: cfg.vllm_command.clone() },
        downloader: downloader.clone(),
        engine: flotilla_engine::EngineClient::new(),
        state: store,
        ports: engines::ports::Ports::new(cfg.ports.clone(), &cfg.address),
        log_dir,
        early_heartbeat: Arc::new(tokio::sync::Notify::new()),
        metrics: metrics.clone(),
        cfg: cfg.clone(),
    });
    let manager = Arc::new(EngineManager::new(env));
    let adopted = manager.adopt();
    tracing::info!(
        node = %cfg.node_name, agent_id = %agent_id, gpus = gpus.gpus().len(), adopted,
        data_dir = %cfg.data_dir.display(), servers = ?cfg.servers, "agent starting"
    );
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut metrics_addr = None;
    if let Some(listener) = metrics_listener {
        metrics_addr = listener.local_addr().ok();
        let (manager, gpus, downloader) = (manager.clone(), gpus.clone(), downloader.clone());
        let render: metrics::Render = Arc::new(move || {
            let refusals = downloader.guard().refusals();
            metrics.render(&manager.reports(), &gpus.probe(), &gpus.usage(), &refusals, downloader.usage())
        });
        tokio::spawn(metrics::serve(listener, render, shutdown_rx.clone()));
        tracing::info!(addr = ?metrics_addr, "agent metrics on /metrics");
    }
    let task = tokio::spawn(connection::run(cfg.clone(), agent_id, gpus.clone(), manager.clone(), shutdown_rx));
    Ok(AgentHandle { cfg, shutdown, task: Some(task), manager, downloader, gpus, metrics_addr, _lock: lock })
}

/// Runs `flotilla agent` until SIGINT or SIGTERM (engines keep running unless
/// `--stop-engines-on-exit`) or a fatal refusal such as a duplicate node name.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    let stop_engines = args.stop_engines_on_exit;
    // Listen before starting: the agent announces itself once registered, and tokio only
    // registers a signal listener when it is created.
    let mut signals = ShutdownSignals::install();
    let mut handle = start(args).await?;
    let result = tokio::select! {
        _ = signals.wait() => {
            tracing::info!(stop_engines, "shutdown signal received");
            Ok(())
        }
        r = handle.wait() => r,
    };
    let end = handle.shutdown(stop_engines).await;
    result.and(end)
}

/// SIGINT and SIGTERM listeners, registered when created.
struct ShutdownSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn install() -> ShutdownSignals {
        use tokio::signal::unix::{signal, SignalKind};
        ShutdownSignals { term: signal(SignalKind::terminate()).ok(), int: signal(SignalKind::interrupt()).ok() }
    }

    async fn wait(&mut self) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => {}
            _ = recv(&mut self.int) => {}
        }
    }
}
