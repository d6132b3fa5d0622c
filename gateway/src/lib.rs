//! flotilla-gateway: the OpenAI-compatible front door of a flotilla fleet.
//!
//! ```text
//!  client ─HTTP─> server (auth, limits, parse) ─> admission (QoS queue, routing pick)
//!                   │                                 │ Lease on an endpoint
//!                   │                                 v
//!                   └──── ObservedBody <── proxy (retries, ejection) ─HTTP─> engine
//!  discovery: cluster (WatchEndpoints, Model/Tenant/Adapter watch) or --backend ─> table
//!  ondemand: EnsureLoaded for adapters no endpoint holds (single-flight), usage reports
//!  hold: requests for a model without endpoints wait for one (scale from zero)
//!  demand: per-model demand -> AutoscaleService.ReportDemand every second
//!  federation: the global gateway (`--federation`): member clusters' gateways as upstreams
//! ```
//!
//! Entry points: [`run`] for `flotilla gateway`, [`start`] for in-process use.
#![forbid(unsafe_code)]

pub mod admission;
pub mod api_code;
pub mod canary;
pub mod cluster;
pub mod concurrency;
pub mod config;
pub mod demand;
pub mod discovery;
pub mod error;
pub mod federation;
pub mod hf_tokenizer;
pub mod hold;
pub mod kv_fleet;
pub mod kv_follow;
pub mod layers;
pub mod leader;
pub mod limits;
pub mod load;
pub mod lora;
pub mod metrics;
pub mod names;
pub mod ondemand;
pub mod ownership;
pub mod pd;
pub mod prompt_tokens;
pub mod proxy;
pub mod qos;
pub mod request;
pub mod routing;
pub mod server;
pub mod source_tokenizers;
pub mod sse;
pub mod state;
pub mod table;
pub mod tokenizer;
pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{Config, GatewayArgs};
pub use error::{ApiCode, ApiError, GatewayError};
pub use state::Gateway;

/// A running gateway started by [`start`].
pub struct GatewayHandle {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    gw: Arc<Gateway>,
    tasks: crate::server::ServerTasks,
}

impl std::fmt::Debug for GatewayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayHandle").field("addr", &self.addr).finish()
    }
}

impl GatewayHandle {
    /// The bound address (the real port when the listen port is 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound `--metrics-listen` address, when given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `http://ADDR`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The shared state (tables, load, metrics), for tests and embedding.
    pub fn state(&self) -> &Arc<Gateway> {
        &self.gw
    }

    /// Stops accepting, lets connections finish (at most `--shutdown-grace-s`) and stops
    /// background tasks.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}

/// Validates `args`, binds, starts discovery and the server, and returns at once (the
/// cluster gateway; [`federation::start`] starts the global one).
pub async fn start(args: GatewayArgs) -> Result<GatewayHandle, GatewayError> {
    if args.federation.federation.is_some() {
        return Err(GatewayError::Usage("--federation: start the global gateway with federation::start".into()));
    }
    let cfg = args.validate()?;
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| GatewayError::Bind { addr: cfg.listen.clone(), source })?;
    let addr = listener.local_addr().map_err(|source| GatewayError::Bind { addr: cfg.listen.clone(), source })?;
    let metrics_listener = match &cfg.metrics_listen {
        Some(m) => {
            let bind_err = |source| GatewayError::Bind { addr: m.clone(), source };
            let l = TcpListener::bind(m).await.map_err(bind_err)?;
            let a = l.local_addr().map_err(bind_err)?;
            Some((l, a))
        }
        None => None,
    };
    if let Some(w) = server::metrics_exposure_warning(addr, metrics_listener.is_some()) {
        tracing::warn!(listen = %addr, "{w}");
    }
    let gw = Arc::new(Gateway::new(cfg));
    let mut background = Vec::new();
    let cfg = &gw.cfg;
    if !cfg.backends.is_empty() {
        gw.dir.set_endpoints(discovery::static_set(&cfg.backends));
        if let Some(every) = cfg.scrape_interval {
            background.push(tokio::spawn(discovery::scrape_loop(gw.clone(), every)));
        }
    } else {
        background.push(tokio::spawn(cluster::watch_endpoints(gw.clone(), cfg.servers.clone())));
    }
    if !cfg.servers.is_empty() {
        background.push(tokio::spawn(cluster::watch_objects(gw.clone(), cfg.servers.clone(), "Model")));
        background.push(tokio::spawn(cluster::watch_objects(gw.clone(), cfg.servers.clone(), "Tenant")));
        background.push(tokio::spawn(cluster::watch_objects(gw.clone(), cfg.servers.clone(), "Adapter")));
        if let Some(fetcher) = cfg.tokenizer_fetcher.clone() {
            background.push(tokio::spawn(source_tokenizers::run(Arc::downgrade(&gw), fetcher)));
        }
    }
    if gw.loader.enabled() {
        background.push(tokio::spawn(ondemand::report_loop(Arc::downgrade(&gw))));
        background.push(tokio::spawn(hold::release_loop(Arc::downgrade(&gw), gw.dir.changes())));
        if let Some(every) = cfg.demand_report_interval {
            background.push(tokio::spawn(demand::report_loop(Arc::downgrade(&gw), every)));
        }
    }
    background.push(tokio::spawn(kv_fleet::run(Arc::downgrade(&gw))));
    // the pump also admits queued requests when engine-reported load drops
    let pump_gw = Arc::downgrade(&gw);
    background.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let Some(gw) = pump_gw.upgrade() else { return };
            for m in gw.admission.busy_models() {
                gw.pump(&m);
            }
        }
    }));
    let (stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn({
        let (gw, mut stop_rx) = (gw.clone(), stop_rx.clone());
        async move {
            if server::await_first_view(&gw, gw.cfg.start_wait, &mut stop_rx).await {
                let https = gw.cfg.https.clone();
                server::serve(listener, server::router(gw.clone()), gw, stop_rx, https).await;
            }
        }
    });
    let metrics_addr = metrics_listener.as_ref().map(|(_, a)| *a);
    let metrics_server = metrics_listener
        .map(|(l, _)| tokio::spawn(server::serve(l, server::metrics_router(gw.clone()), gw.clone(), stop_rx, None)));
    tracing::info!(addr = %addr, metrics = ?metrics_addr, auth = gw.cfg.auth, backends = gw.cfg.backends.len(), servers = gw.cfg.servers.len(), "gateway started");
    let tasks = crate::server::ServerTasks { stop, server: Some(server), metrics_server, background };
    Ok(GatewayHandle { addr, metrics_addr, gw, tasks })
}

/// `flotilla gateway`: prints `flotilla gateway listening on http(s)://ADDR` and serves until
/// SIGINT or SIGTERM.
pub async fn run(args: GatewayArgs) -> Result<(), GatewayError> {
    if args.federation.federation.is_some() {
        return federation::run(args).await;
    }
    let handle = start(args).await?;
    server::announce_and_wait(handle.gw.cfg.https.is_some(), handle.local_addr(), handle.metrics_addr()).await?;
    handle.shutdown().await;
    Ok(())
}
