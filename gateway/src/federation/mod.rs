//! The global gateway tier of a federation (`flotilla gateway --federation SERVERS`): one
//! OpenAI endpoint in front of the member clusters' gateways. It routes each request to a
//! member by model availability, health, region affinity and measured latency, spills
//! over on saturation and fails over before the first byte; the federation servers only
//! tell it which clusters exist, and it keeps routing on the last list without them.
//!
//! ```text
//! federation servers ─List Cluster (every 2 s, any server; last list kept)─> discovery
//!                                                                              │ members
//! member gateways <─GET /v1/models (models, health, latency; probes when down)─ poll
//!       ^
//!       │ the client's request, body buffered, Authorization passed through
//! client ─> server (auth stance, region, bounded body) ─> proxy: candidates in order
//!            (region, latency, in flight) tried in turn until one answers ─> stream back
//! ```
//!
//! Entry points: [`run`] for `flotilla gateway --federation`, [`start`] for in-process use.

pub mod config;
pub mod discovery;
pub mod members;
pub mod metrics;
pub mod poll;
pub mod proxy;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{FedConfig, FederationArgs};

use crate::config::GatewayArgs;
use crate::error::GatewayError;

/// The client to member gateways: HTTP/1.1 with keep-alive pooling, plain or TLS.
pub type MemberClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The global gateway's shared state.
pub struct Federation {
    pub cfg: FedConfig,
    pub members: members::Members,
    pub metrics: metrics::FedMetrics,
    pub client: MemberClient,
}

impl Federation {
    pub fn new(cfg: FedConfig) -> Federation {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(cfg.base.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*cfg.member_tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Federation { cfg, members: members::Members::default(), metrics: metrics::FedMetrics::new(), client }
    }
}

/// A running global gateway started by [`start`].
pub struct FederationHandle {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    fed: Arc<Federation>,
    tasks: crate::server::ServerTasks,
}

impl FederationHandle {
    /// The bound address (the real port when the listen port is 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound `--metrics-listen` address, when given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The shared state, for tests and embedding.
    pub fn state(&self) -> &Arc<Federation> {
        &self.fed
    }

    /// Stops accepting, lets requests in flight finish (at most `--shutdown-grace-s`) and
    /// stops the background tasks.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}

/// Holds new connections (in the listener's backlog) until the first Cluster list came and
/// every member was polled once, at most `limit`; false if stopped first.
async fn await_first_view(fed: &Federation, limit: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let t0 = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        if *stop.borrow() {
            return false;
        }
        if fed.members.listed() && fed.members.snapshot().values().all(|m| m.polled()) {
            return true;
        }
        if t0.elapsed() >= limit {
            tracing::warn!(waited_s = limit.as_secs(), "no Cluster list or member answers yet; accepting anyway");
            return true;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
    }
}

/// Validates `args` (with `--federation`), binds, starts the Cluster list and the server,
/// and returns at once.
pub async fn start(args: GatewayArgs) -> Result<FederationHandle, GatewayError> {
    let cfg = FedConfig::from_args(&args)?;
    let bind = |addr: &String| {
        let addr = addr.clone();
        async move {
            let l =
                TcpListener::bind(&addr).await.map_err(|source| GatewayError::Bind { addr: addr.clone(), source })?;
            let a = l.local_addr().map_err(|source| GatewayError::Bind { addr, source })?;
            Ok::<_, GatewayError>((l, a))
        }
    };
    let (listener, addr) = bind(&cfg.base.listen).await?;
    let metrics_listener = match &cfg.base.metrics_listen {
        Some(m) => Some(bind(m).await?),
        None => None,
    };
    if let Some(w) = crate::server::metrics_exposure_warning(addr, metrics_listener.is_some()) {
        tracing::warn!(listen = %addr, "{w}");
    }
    let fed = Arc::new(Federation::new(cfg));
    let background = vec![tokio::spawn(discovery::run(fed.clone()))];
    let opts = crate::server::ServeOptions {
        header_timeout: fed.cfg.base.header_timeout,
        shutdown_grace: fed.cfg.base.shutdown_grace,
        tls_handshake_failures: fed.metrics.tls_handshake_failures.clone(),
    };
    let (stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn({
        let (fed, mut stop_rx, opts) = (fed.clone(), stop_rx.clone(), opts.clone());
        async move {
            if await_first_view(&fed, fed.cfg.base.start_wait, &mut stop_rx).await {
                let https = fed.cfg.base.https.clone();
                crate::server::serve_with(listener, server::router(fed), opts, stop_rx, https).await;
            }
        }
    });
    let metrics_addr = metrics_listener.as_ref().map(|(_, a)| *a);
    let metrics_server = metrics_listener.map(|(l, _)| {
        tokio::spawn(crate::server::serve_with(l, server::metrics_router(fed.clone()), opts, stop_rx, None))
    });
    tracing::info!(addr = %addr, metrics = ?metrics_addr, auth = fed.cfg.base.auth, servers = ?fed.cfg.servers, region = ?fed.cfg.region, "global gateway started");
    let tasks = crate::server::ServerTasks { stop, server: Some(server), metrics_server, background };
    Ok(FederationHandle { addr, metrics_addr, fed, tasks })
}

/// `flotilla gateway --federation`: prints `flotilla gateway listening on http(s)://ADDR`
/// and serves until SIGINT or SIGTERM.
pub async fn run(args: GatewayArgs) -> Result<(), GatewayError> {
    let handle = start(args).await?;
    let https = handle.fed.cfg.base.https.is_some();
    crate::server::announce_and_wait(https, handle.local_addr(), handle.metrics_addr()).await?;
    handle.shutdown().await;
    Ok(())
}
