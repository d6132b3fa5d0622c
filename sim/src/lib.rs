//! `flotilla sim`: a simulated vLLM engine with vLLM's HTTP surface, scheduler behaviour
//! and metric names, for tests, benchmarks and laptops without GPUs (issue 4).
//!
//! ```text
//!  config (SimArgs -> EngineConfig) ──┐
//!                                     v
//!  http (axum router) ──Command──> engine (one task: step loop) ──> scheduler (pure)
//!       ^                              │──> lora_cache (CPU/GPU LRU)    └─> kv (block manager, prefix cache)
//!       └──────────Event (tokens)──────┘──> metrics (vLLM names)   latency (profiles)
//! ```
//!
//! Entry points: [`run`] for the `flotilla sim` subcommand, [`start`] for in-process tests
//! (a gang's head too), [`start_worker`] for a headless gang member (`rendezvous.rs`).
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
pub mod error;
pub mod faults;
pub mod http;
pub mod id_map;
pub mod kv;
pub mod kv_publisher;
pub mod latency;
pub mod lora;
pub mod lora_cache;
pub mod mailbox;
pub mod metrics;
pub mod parallel;
pub mod pd;
pub mod rendezvous;
pub mod scheduler;
pub mod side_channel;
pub mod text;
pub mod tokenizer;
pub mod vocab;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use config::{EngineConfig, SimArgs};
pub use error::SimError;
pub use parallel::{GangArgs, GangRole, Layout};
pub use rendezvous::GangState;

/// Wall time from a gang rank's loss (when /health turns 503) to the head's exit: long
/// enough for a supervisor polling /health to see the failure first.
pub const GANG_LOSS_EXIT_DELAY: Duration = Duration::from_secs(1);

/// What a crash fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrashMode {
    /// Exit the process with status 1 (the `flotilla sim` process).
    Exit,
    /// Stop listening and abort every request (in-process servers).
    StopServer,
}

/// A running simulator started by [`start`].
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    model: String,
    /// Serving HTTPS (`--ssl-certfile`).
    tls: bool,
    /// Where a gang head accepts its workers.
    gang_addr: Option<SocketAddr>,
    /// The bound P/D side channel (`--kv-transfer-config`).
    side_channel: Option<SocketAddr>,
    run: Running,
}

/// A background task told to stop through a watch channel: stopped on drop, awaited by
/// `shutdown` or `stopped` (shared by [`SimHandle`] and [`WorkerHandle`]).
#[derive(Debug)]
struct Running {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), SimError>>>,
}

impl Running {
    async fn shutdown(&mut self) -> Result<(), SimError> {
        let _ = self.stop.send(true);
        self.join().await
    }

    async fn join(&mut self) -> Result<(), SimError> {
        match self.task.take() {
            Some(t) => t.await.map_err(|e| SimError::Engine(e.to_string()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl SimHandle {
    /// The bound address (the real port when `--port 0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, or `https://ADDR` when serving TLS, for clients.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The served model name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// A gang head's bound rendezvous address (the real port when `--master-port 0`).
    pub fn gang_addr(&self) -> Option<SocketAddr> {
        self.gang_addr
    }

    /// The bound P/D side channel (the real port when its port is 0), with a KV connector.
    pub fn side_channel_addr(&self) -> Option<SocketAddr> {
        self.side_channel
    }

    /// Aborts in-flight requests, stops serving and waits (at most ~2 s) for the server.
    pub async fn shutdown(mut self) -> Result<(), SimError> {
        self.run.shutdown().await
    }

    /// Waits until the server stops by itself (a crash fault) or fails (a gang head whose
    /// gang lost a rank, or never formed: [`SimError::Gang`]).
    pub async fn stopped(&mut self) -> Result<(), SimError> {
        self.run.join().await
    }
}

fn listen_addr(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Validates `args`, binds, starts the engine task and the HTTP server, and returns at
/// once. Dropping the handle shuts the server down.
pub async fn start(args: SimArgs) -> Result<SimHandle, SimError> {
    start_with(args, CrashMode::StopServer).await
}

async fn start_with(args: SimArgs, crash: CrashMode) -> Result<SimHandle, SimError> {
    let cfg = args.validate()?;
    if matches!(cfg.gang, GangRole::Worker { .. }) {
        return Err(SimError::invalid("headless", "a headless worker serves no API; start it with start_worker"));
    }
    let tls = match (&args.ssl_certfile, &args.ssl_keyfile) {
        (Some(cert), Some(key)) => Some(http::serve::https(cert, key)?),
        _ => None,
    };
    let want = listen_addr(&args.host, args.port);
    let listener = TcpListener::bind(&want).await.map_err(|source| SimError::Bind { addr: want.clone(), source })?;
    let addr = listener.local_addr().map_err(|source| SimError::Bind { addr: want, source })?;
    let gang = match &cfg.gang {
        GangRole::Head { kind, listen, world, own, timeout } => {
            let gl =
                TcpListener::bind(listen).await.map_err(|source| SimError::Bind { addr: listen.clone(), source })?;
            let gang_addr = gl.local_addr().map_err(|source| SimError::Bind { addr: listen.clone(), source })?;
            let (tx, rx) = watch::channel(GangState::Forming { missing: (*own..*world).collect() });
            let spec = rendezvous::HeadSpec { kind: *kind, world: *world, own: *own };
            let task = tokio::spawn(rendezvous::serve_head(gl, spec, tx));
            tracing::info!(gang_addr = %gang_addr, world, own, kind = kind.as_str(), "gang head waiting for its workers");
            Some((gang_addr, rx, task, *timeout))
        }
        _ => None,
    };

    let mut m = metrics::Metrics::new(&cfg.model, cfg.max_model_len, cfg.lora_enabled.then_some(cfg.max_loras));
    m.set_cache_config(&metrics::CacheInfo {
        block_size: cfg.block_size,
        num_gpu_blocks: cfg.num_blocks,
        num_gpu_blocks_override: args.num_gpu_blocks,
        prefix_caching: cfg.prefix_caching,
        max_model_len: cfg.max_model_len,
        kv_bytes_per_token: cfg.profile.kv_bytes_per_token,
    });
    let metrics = Arc::new(Mutex::new(m));
    let registry = Arc::new(lora::Registry::new(cfg.lora_enabled, cfg.max_lora_rank));
    let faults = Arc::new(faults::Faults::new());
    let kv_events = match cfg.kv_events.clone() {
        Some(c) => Some(kv_publisher::start(c, &addr.ip().to_string()).await?),
        None => None,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let side = match &cfg.kv_transfer {
        Some(k) => {
            let want = listen_addr(&k.side_channel_host, k.side_channel_port);
            let l = TcpListener::bind(&want).await.map_err(|source| SimError::Bind { addr: want.clone(), source })?;
            let bound = l.local_addr().map_err(|source| SimError::Bind { addr: want, source })?;
            tracing::info!(side_channel = %bound, engine_id = %k.engine_id, connector = %k.connector, "P/D side channel listening");
            Some((bound, tokio::spawn(side_channel::serve(l, tx.clone()))))
        }
        None => None,
    };
    if cfg.kv_transfer.is_some() {
        metrics.lock().unwrap_or_else(|p| p.into_inner()).nixl.enabled = true;
    }
    let engine = engine::Engine::new(cfg.clone(), metrics.clone(), registry.clone(), faults.clone())
        .with_kv_events(kv_events.clone());
    let engine_task = tokio::spawn(engine.run(rx));
    load_static_loras(&cfg, &registry, &tx).await?;
    tracing::info!(
        addr = %addr, model = %cfg.model, profile = cfg.profile.name, kv_blocks = cfg.num_blocks,
        block_size = cfg.block_size, max_num_seqs = cfg.max_num_seqs,
        max_num_batched_tokens = cfg.max_num_batched_tokens, speedup = cfg.speedup, tls = tls.is_some(),
        "sim engine started"
    );
    let serving_tls = tls.is_some();
    let state = http::AppState {
        cfg: Arc::new(cfg.clone()),
        engine: tx.clone(),
        metrics,
        lora: registry,
        faults: faults.clone(),
        ids: Arc::new(AtomicU64::new(1)),
        id_salt: u64::from(addr.port()) ^ u64::from(std::process::id()) << 16,
        ready_at: tokio::time::Instant::now() + cfg.startup,
        vocab: Arc::default(),
        gang: gang.as_ref().map(|g| g.1.clone()),
        kv_event_sources: kv_events.map(|p| p.sources),
        side_channel_port: side.as_ref().map(|s| s.0.port()),
    };
    let app = http::router(state);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let graceful_rx = stop_tx.subscribe();
    let gang_addr = gang.as_ref().map(|g| g.0);
    let side_channel = side.as_ref().map(|s| s.0);
    let side_task = side.map(|s| s.1);
    let (gang_rx, rendezvous, gang_timeout) = match gang {
        Some((_, rx, task, timeout)) => (Some(rx), Some(task), timeout),
        None => (None, None, Duration::ZERO),
    };
    let task = tokio::spawn(async move {
        let _rendezvous = AbortOnDrop(rendezvous); // closes every worker's socket when we end
        let _side_channel = AbortOnDrop(side_task);
        let mut server = tokio::spawn(http::serve::serve(listener, app, http::serve::KEEP_ALIVE, tls, graceful_rx));
        let crashed = tokio::select! {
            r = &mut server => {
                let _ = tx.send(engine::Command::Shutdown);
                return r.map_err(|e| SimError::Engine(e.to_string()));
            }
            _ = stop_rx.wait_for(|s| *s) => Ok(false),
            _ = faults.crash.notified() => Ok(true),
            e = gang_failure(gang_rx, gang_timeout) => Err(e),
        };
        let crashed = match crashed {
            Ok(crashed) => crashed,
            Err(e) => {
                server.abort();
                let _ = tx.send(engine::Command::Shutdown);
                let _ = tokio::time::timeout(Duration::from_secs(2), engine_task).await;
                return Err(e);
            }
        };
        if crashed {
            tracing::error!(addr = %addr, "crash fault injected");
            if crash == CrashMode::Exit {
                eprintln!("flotilla sim: crash fault injected; exiting");
                std::process::exit(1);
            }
            server.abort();
        }
        let _ = tx.send(engine::Command::Shutdown);
        let _ = tokio::time::timeout(Duration::from_secs(2), engine_task).await;
        match tokio::time::timeout(Duration::from_secs(2), &mut server).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Ok(()), // aborted after a crash
            Err(_) => {
                server.abort(); // hung requests (hang fault) never finish
                Ok(())
            }
        }
    });
    Ok(SimHandle {
        addr,
        model: cfg.model,
        tls: serving_tls,
        gang_addr,
        side_channel,
        run: Running { stop: stop_tx, task: Some(task) },
    })
}

/// Aborts the task when dropped.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

/// Resolves when a gang head must fail: its gang did not form within `timeout`, or a rank
/// left after it formed (then after [`GANG_LOSS_EXIT_DELAY`]). Never, without a gang.
async fn gang_failure(rx: Option<watch::Receiver<GangState>>, timeout: Duration) -> SimError {
    let Some(mut rx) = rx else { return std::future::pending().await };
    let formed =
        tokio::time::timeout(timeout, async { rx.wait_for(|s| !matches!(s, GangState::Forming { .. })).await.is_ok() })
            .await;
    match formed {
        Err(_) => {
            let why = rx.borrow().unavailable().unwrap_or_default();
            return SimError::Gang(format!("the gang did not form within {timeout:?} ({why})"));
        }
        Ok(false) => return std::future::pending().await,
        Ok(true) => {}
    }
    let lost = rx.wait_for(|s| matches!(s, GangState::Lost { .. })).await.map(|s| s.clone());
    let Ok(GangState::Lost { rank }) = lost else { return std::future::pending().await };
    tracing::error!(rank, delay = ?GANG_LOSS_EXIT_DELAY, "a gang rank disconnected; /health answers 503 and the head exits");
    tokio::time::sleep(GANG_LOSS_EXIT_DELAY).await;
    SimError::Gang(format!("rank {rank} of the gang disconnected"))
}

/// `--lora-modules`: each adapter loaded as `/v1/load_lora_adapter` loads it, one after
/// another, before the API answers (vLLM registers its static adapters before serving).
async fn load_static_loras(
    cfg: &config::EngineConfig,
    registry: &Arc<lora::Registry>,
    engine: &tokio::sync::mpsc::UnboundedSender<engine::Command>,
) -> Result<(), SimError> {
    for (name, path) in &cfg.lora_modules {
        let a = registry
            .prepare(name, path, false)
            .map_err(|e| SimError::invalid("lora-modules", format!("{name}={path}: {e}")))?;
        let (done, loaded) = tokio::sync::oneshot::channel();
        let lora = lora::LoraRef { id: a.id, rank: a.rank };
        if engine.send(engine::Command::LoadLora { lora, inplace: false, done }).is_err() || loaded.await.is_err() {
            return Err(SimError::Engine(format!("the engine stopped while loading {name}")));
        }
        registry.commit(a);
    }
    if !cfg.lora_modules.is_empty() {
        tracing::info!(adapters = cfg.lora_modules.len(), "static LoRA adapters loaded (--lora-modules)");
    }
    Ok(())
}

/// A headless gang member started by [`start_worker`]: it serves no API.
#[derive(Debug)]
pub struct WorkerHandle {
    head: String,
    joined: watch::Receiver<bool>,
    run: Running,
}

impl WorkerHandle {
    /// The head's rendezvous address this worker joins.
    pub fn head(&self) -> &str {
        &self.head
    }

    /// Waits until the head accepted this worker: true, or false if the worker ended first.
    pub async fn joined(&self) -> bool {
        let mut rx = self.joined.clone();
        let joined = rx.wait_for(|j| *j).await.is_ok();
        joined
    }

    /// Closes the connection to the head (as a killed worker would) and waits for the task.
    pub async fn shutdown(mut self) -> Result<(), SimError> {
        self.run.shutdown().await
    }

    /// Waits until the worker ends: an error when the head refused it, never answered in
    /// time, or its connection dropped.
    pub async fn stopped(&mut self) -> Result<(), SimError> {
        self.run.join().await
    }
}

/// Validates `args` (which must name a headless worker), and starts joining the head with
/// retries in the background; returns at once.
pub async fn start_worker(args: SimArgs) -> Result<WorkerHandle, SimError> {
    let cfg = args.validate()?;
    let GangRole::Worker { kind, head, first, count, world, timeout } = cfg.gang else {
        return Err(SimError::invalid("headless", "not given; only a headless worker joins a head"));
    };
    let spec = rendezvous::WorkerSpec { kind, first, count, world };
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let (joined_tx, joined_rx) = watch::channel(false);
    let head2 = head.clone();
    let task = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let sock = tokio::select! {
            r = rendezvous::join(&head2, spec, deadline) => r?,
            _ = stop_rx.wait_for(|s| *s) => return Ok(()),
        };
        joined_tx.send_replace(true);
        tracing::info!(head = %head2, first, count, world, "joined the gang's head");
        tokio::select! {
            e = rendezvous::hold(sock, &head2) => Err(e),
            _ = stop_rx.wait_for(|s| *s) => Ok(()),
        }
    });
    Ok(WorkerHandle { head, joined: joined_rx, run: Running { stop: stop_tx, task: Some(task) } })
}

/// `flotilla sim --headless`: prints `flotilla sim headless ranks A..B of W joining HEAD`,
/// joins, and runs until SIGTERM (exit 0) or until the head is lost (exit 1).
async fn run_worker(args: SimArgs, (first, count, world): (u32, u32, u32)) -> Result<(), SimError> {
    let mut handle = start_worker(args).await?;
    let banner = format!("flotilla sim headless ranks {first}..{} of {world} joining {}", first + count, handle.head());
    serve_until_signal(&mut handle.run, &banner).await
}

/// Runs `flotilla sim`: binds, prints `flotilla sim listening on http://ADDR model=NAME`
/// (`https://` with `--ssl-certfile`) on stdout, and serves until ctrl-c or SIGTERM (or a crash fault, which exits).
pub async fn run(args: SimArgs) -> Result<(), SimError> {
    if let GangRole::Worker { first, count, world, .. } = args.validate()?.gang {
        return run_worker(args, (first, count, world)).await;
    }
    let mut handle = start_with(args, CrashMode::Exit).await?;
    let banner = format!("flotilla sim listening on {} model={}", handle.base_url(), handle.model());
    serve_until_signal(&mut handle.run, &banner).await
}

/// Prints `banner` on stdout, then waits for SIGTERM or ctrl-c (and stops `run`) or for
/// `run` to end by itself. The signals are watched before the banner: a supervisor may send
/// SIGTERM as soon as it has read that line, and a signal before the handler exists would
/// kill us.
async fn serve_until_signal(run: &mut Running, banner: &str) -> Result<(), SimError> {
    let shutdown = ShutdownSignal::install();
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{banner}");
        let _ = out.flush();
    }
    tokio::select! {
        _ = shutdown.wait() => {
            tracing::info!("shutdown signal received");
            run.shutdown().await
        }
        r = run.join() => r,
    }
}

/// SIGINT and SIGTERM listeners, registered when created (not when first polled).
struct ShutdownSignal {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    fn install() -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, signal = name, "cannot watch this signal");
                None
            }
        };
        ShutdownSignal {
            term: listen(SignalKind::terminate(), "SIGTERM"),
            int: listen(SignalKind::interrupt(), "SIGINT"),
        }
    }

    async fn wait(mut self) {
        let term = async {
            match self.term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let int = async {
            match self.int.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term => {}
            _ = int => {}
        }
    }
}
