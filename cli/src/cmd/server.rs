//! `flotilla server`: one member of the Raft group.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use flotilla_actors::ActorsConfig;
use flotilla_cluster::ServerConfig;

use crate::error::CliError;

#[derive(Args, Debug, Clone)]
pub(crate) struct ServerArgs {
    /// This server's Raft ID: a positive integer, unique in the cluster.
    #[arg(long, env = "FLOTILLA_ID")]
    pub(crate) id: u64,
    /// Directory for the Raft log, state machine and snapshots (created if absent).
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub(crate) data_dir: PathBuf,
    /// gRPC listen address: the API, and Raft traffic too unless --peer-addr is given. Port 0
    /// picks a free port.
    #[arg(long, env = "FLOTILLA_GRPC_ADDR", default_value = "127.0.0.1:7070")]
    pub(crate) grpc_addr: SocketAddr,
    /// HTTP listen address for /metrics, /healthz and /readyz. Port 0 picks a free port.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:7071")]
    pub(crate) http_addr: SocketAddr,
    /// Address other servers use to reach this one (default: the bound gRPC address).
    #[arg(long, env = "FLOTILLA_ADVERTISE_ADDR")]
    pub(crate) advertise_addr: Option<String>,
    /// A listener of its own for server-to-server traffic (Raft, and the calls a follower
    /// forwards to the leader): firewall it to the servers' network. With TLS it accepts
    /// only server certificates, and the --grpc-addr listener then serves no Raft method.
    /// Members know each other by this address (give it, not the API address, to
    /// `cluster add-member`).
    ///
    /// Example: --grpc-addr 0.0.0.0:7070 --peer-addr 10.1.0.4:7072
    #[arg(long, env = "FLOTILLA_PEER_ADDR")]
    pub(crate) peer_addr: Option<SocketAddr>,
    /// The peer address other servers dial (default: the bound --peer-addr).
    #[arg(long, env = "FLOTILLA_ADVERTISE_PEER_ADDR", requires = "peer_addr")]
    pub(crate) advertise_peer_addr: Option<String>,
    /// Start a new single-member cluster if the data dir holds none (ignored otherwise).
    #[arg(long, conflicts_with = "join")]
    pub(crate) bootstrap: bool,
    /// Join the cluster served at this gRPC address (any member); retried until it works.
    #[arg(long, env = "FLOTILLA_JOIN")]
    pub(crate) join: Option<String>,
    /// Disaster recovery for a group that lost its majority for good: keep this server's
    /// state (applying every entry in its log, committed or not), rewrite the membership to
    /// this server alone and lead. Then join fresh servers to it. Only with the other members
    /// down for good (they would form a second cluster: split brain), and remove the flag
    /// for later restarts. See docs/deploy.md, "Disaster recovery".
    #[arg(long, conflicts_with = "join")]
    pub(crate) force_new_cluster: bool,
    /// Run a federation server: its Raft group holds member Clusters and FederatedModels
    /// (Model templates spread over the clusters by policy), and its leader keeps each
    /// cluster's member Models through that cluster's API. It runs no agents' controllers
    /// and refuses Models, Adapters and Tenants. See docs/federation.md.
    #[arg(long)]
    pub(crate) federation: bool,
    /// Leader heartbeat interval, milliseconds.
    #[arg(long, default_value_t = 50)]
    pub(crate) heartbeat_ms: u64,
    /// Minimum election timeout, milliseconds (must exceed twice the heartbeat). A follower
    /// waits out a leader lease of the maximum timeout first, so failover takes roughly
    /// max + a random value in [min, max]. Connections to other servers take their timeouts
    /// from these: connect within max, HTTP/2 ping every min, given up after max unanswered.
    #[arg(long, default_value_t = 200)]
    pub(crate) election_timeout_min_ms: u64,
    /// Maximum election timeout, milliseconds.
    #[arg(long, default_value_t = 400)]
    pub(crate) election_timeout_max_ms: u64,
    /// Snapshot the state machine and compact the log every this many entries.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) snapshot_every: u64,
    /// Log entries kept after a snapshot, for followers that lag a little.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) keep_logs: u64,
    /// Change events kept so watches can resume after a reconnect.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) watch_history: usize,
    /// How long a write or linearizable read may wait for the Raft group, seconds.
    #[arg(long, default_value_t = 10)]
    pub(crate) request_timeout_s: u64,
    /// Largest snapshot accepted from a leader, bytes; a snapshot chunk ending beyond it is
    /// refused.
    #[arg(long, default_value_t = 4 << 30)]
    pub(crate) max_snapshot_bytes: u64,
    /// A node whose agent sent no heartbeat for this long becomes NotReady, milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub(crate) node_ttl_ms: u64,
    /// After this further grace period NotReady, a node's replicas move elsewhere, ms.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) reschedule_grace_ms: u64,
    /// How often agents send heartbeats, milliseconds.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) agent_heartbeat_ms: u64,
    /// Default placement of replicas on nodes: bin-pack or spread.
    #[arg(long, default_value = "bin-pack")]
    pub(crate) placement: String,
    /// How long a crash-looping (Failed) replica counts before it is replaced, ms.
    #[arg(long, default_value_t = 30_000)]
    pub(crate) failed_replace_backoff_ms: u64,
    /// Serve a non-loopback --grpc-addr without TLS (refused otherwise): anyone who can
    /// reach the port can then do anything. Only on a network you trust.
    #[arg(long)]
    pub(crate) insecure: bool,
}

impl ServerArgs {
    pub(crate) fn config(&self) -> ServerConfig {
        ServerConfig {
            grpc_addr: self.grpc_addr,
            http_addr: self.http_addr,
            advertise_addr: self.advertise_addr.clone(),
            peer_addr: self.peer_addr,
            advertise_peer_addr: self.advertise_peer_addr.clone(),
            bootstrap: self.bootstrap,
            join: self.join.clone(),
            force_new_cluster: self.force_new_cluster,
            heartbeat_ms: self.heartbeat_ms,
            election_timeout_min_ms: self.election_timeout_min_ms,
            election_timeout_max_ms: self.election_timeout_max_ms,
            snapshot_every: self.snapshot_every,
            keep_logs: self.keep_logs,
            watch_history: self.watch_history,
            request_timeout: Duration::from_secs(self.request_timeout_s.max(1)),
            insecure: self.insecure,
            max_snapshot_bytes: self.max_snapshot_bytes,
            federation: self.federation,
            ..ServerConfig::new(self.id, self.data_dir.clone())
        }
    }
}

impl ServerArgs {
    /// Whether to warn that a reachable listener runs without TLS.
    fn tls_off_warning(&self) -> bool {
        self.insecure && !self.grpc_addr.ip().is_loopback()
    }

    pub(crate) fn actors_config(&self) -> Result<ActorsConfig, CliError> {
        let config = ActorsConfig {
            node_ttl_ms: self.node_ttl_ms,
            reschedule_grace_ms: self.reschedule_grace_ms,
            heartbeat_interval_ms: self.agent_heartbeat_ms,
            placement: self
                .placement
                .parse()
                .map_err(|e: flotilla_actors::ActorsError| CliError::usage(e.to_string()))?,
            failed_replace_backoff_ms: self.failed_replace_backoff_ms,
            ..ActorsConfig::default()
        };
        config.validate().map_err(|e| CliError::usage(e.to_string()))?;
        Ok(config)
    }
}

/// Runs a server until SIGINT or SIGTERM (its logs and traces are set up by `main`'s
/// `telemetry`).
pub(crate) async fn run(args: ServerArgs, tls: &flotilla_security::TlsArgs) -> Result<(), CliError> {
    let mut config = args.config();
    config.tls = flotilla_security::Tls::from_args(tls).map_err(|e| CliError::usage(e.to_string()))?;
    config.validate()?;
    let extensions: flotilla_cluster::Extensions = match args.federation {
        true => flotilla_federation::extensions(flotilla_federation::FederationConfig {
            own_ca: tls.tls_ca.clone(),
            ..Default::default()
        }),
        false => flotilla_actors::extensions(args.actors_config()?),
    };
    let handle = flotilla_cluster::start_with(config, extensions).await?;
    let signals = Signals::install()?;
    let peer = handle.peer_addr.map_or_else(String::new, |p| format!(" peer={p}"));
    println!("flotilla server {} listening grpc={} http={}{peer}", handle.id, handle.grpc_addr, handle.http_addr);
    if args.tls_off_warning() {
        eprintln!("warning: TLS is off (--insecure): every call on {} is allowed to anyone", handle.grpc_addr);
    }
    tokio::select! {
        () = signals.wait() => {}
        reason = handle.stopped() => return Err(CliError::runtime(format!("server stopped: {reason}"))),
    }
    handle.shutdown().await;
    Ok(())
}

/// SIGINT and SIGTERM listeners. Install them before announcing readiness: tokio registers
/// a listener when it is created, and a signal that arrives before that kills the process
/// (or, once another listener exists, is missed by a later one).
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> Result<Signals, CliError> {
        use tokio::signal::unix::{signal, SignalKind};
        let listen =
            |kind| signal(kind).map_err(|e| CliError::runtime(format!("cannot install a signal handler: {e}")));
        Ok(Signals { term: listen(SignalKind::terminate())?, int: listen(SignalKind::interrupt())? })
    }

    /// Resolves on the first SIGINT or SIGTERM.
    pub(crate) async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => tracing::info!("interrupted; shutting down"),
            _ = self.term.recv() => tracing::info!("terminated; shutting down"),
        }
    }
}
