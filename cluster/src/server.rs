//! Starting and stopping a server: open storage, create the Raft member, bind the gRPC and
//! HTTP listeners, then bootstrap or join.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_api::pb::cluster_service_client::ClusterServiceClient;
use flotilla_api::pb::cluster_service_server::ClusterServiceServer;
use flotilla_api::pb::object_service_server::ObjectServiceServer;
use flotilla_api::pb::raft_service_server::RaftServiceServer;
use flotilla_api::pb::tenant_key_service_server::TenantKeyServiceServer;
use flotilla_api::pb::AddMemberRequest;
use flotilla_security::{AuthorizeLayer, Mode};
use flotilla_storage::Raft;
use openraft::BasicNode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster_service::ClusterServiceImpl;
use crate::metrics::Metrics;
use crate::network::Network;
use crate::node::Node;
use crate::object_service::ObjectServiceImpl;
use crate::peers::{PeerTimings, Peers};
use crate::raft_service::RaftServiceImpl;
use crate::{ClusterError, ClusterHandle, ServerConfig};
use tonic::service::RoutesBuilder;

/// Largest API request accepted, in bytes (manifests are limited further, to 256 KiB).
const MAX_API_MESSAGE: usize = 1 << 20;
/// Largest Raft message (snapshot chunks are 3 MiB by default).
const MAX_RAFT_MESSAGE: usize = 64 << 20;

/// A running server. Dropping it does not stop it; call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    pub id: u64,
    pub grpc_addr: SocketAddr,
    /// The peer listener's address, when the server has one (`ServerConfig::peer_addr`).
    pub peer_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    raft: Raft,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Stops serving and shuts the Raft member down.
    pub async fn shutdown(self) {
        let _ = self.stop_tx.send(true);
        let _ = self.raft.shutdown().await;
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }

    /// Resolves when the server stops on its own (a fatal Raft error).
    pub async fn stopped(&self) -> String {
        let mut m = self.raft.metrics();
        loop {
            if let Err(e) = &m.borrow().running_state {
                return e.to_string();
            }
            if m.changed().await.is_err() {
                return "raft stopped".into();
            }
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ClusterError> {
    TcpListener::bind(addr).await.map_err(|source| ClusterError::Bind { addr: addr.to_string(), source })
}

/// Adds services to a server's gRPC port: given the server's [`ClusterHandle`], register
/// services on the builder (the controller actors' agent and endpoint services, say).
pub type Extensions = Box<dyn FnOnce(ClusterHandle, &mut RoutesBuilder) + Send>;

/// Starts a server and returns once it is listening (not necessarily part of a cluster).
pub async fn start(config: ServerConfig) -> Result<ServerHandle, ClusterError> {
    start_with(config, Box::new(|_, _| {})).await
}

/// Like [`start`], with extra gRPC services on the same port.
pub async fn start_with(config: ServerConfig, extensions: Extensions) -> Result<ServerHandle, ClusterError> {
    config.validate()?;
    let raft_config = std::sync::Arc::new(config.raft_config()?);
    let grpc_listener = bind(config.grpc_addr).await?;
    let http_listener = bind(config.http_addr).await?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| ClusterError::Bind { addr: config.grpc_addr.to_string(), source })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| ClusterError::Bind { addr: config.http_addr.to_string(), source })?;
    let peer_listener = match config.peer_addr {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let peer_addr = match &peer_listener {
        Some(l) => Some(
            l.local_addr().map_err(|source| ClusterError::Bind { addr: format!("{:?}", config.peer_addr), source })?,
        ),
        None => None,
    };
    // Members know each other by the address Raft and forwards travel on.
    let advertise = match peer_addr {
        Some(p) => config.advertise_peer_addr.clone().unwrap_or_else(|| p.to_string()),
        None => config.advertise_addr.clone().unwrap_or_else(|| grpc_addr.to_string()),
    };

    if config.join.is_some() && flotilla_storage::seed::pending_restore(&config.data_dir) {
        return Err(ClusterError::InvalidArgument(format!(
            "data dir {} holds a restored backup that seeds a new cluster: start this server without --join \
             (the other servers join it)",
            config.data_dir.display()
        )));
    }
    let start = flotilla_storage::seed::StartAs {
        id: config.id,
        addr: advertise.clone(),
        force_new_cluster: config.force_new_cluster,
    };
    let (log_store, state_machine, seeded) =
        flotilla_storage::seed::open_server(&config.data_dir, config.watch_history, &start).await?;
    match seeded {
        flotilla_storage::seed::Seeded::Nothing => {}
        s => tracing::warn!(id = config.id, seeded = ?s, "data dir seeded as a new single-member cluster"),
    }
    let reader = state_machine.reader();
    let peers = Peers::new(
        PeerTimings::from_raft(config.election_timeout_min_ms, config.election_timeout_max_ms),
        config.tls.clone(),
    );
    let network = Network { peers: peers.clone() };
    let raft = Raft::new(config.id, raft_config, network, log_store, state_machine)
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
    let node = Node {
        id: config.id,
        raft: raft.clone(),
        reader,
        peers,
        metrics: Metrics::new(),
        request_timeout: config.request_timeout,
        batcher: crate::batcher::spawn_batcher(raft.clone()),
        read_barrier_term: Default::default(),
        leadership: Default::default(),
        trace_links: Default::default(),
        federation: config.federation,
    };

    let mut extra = RoutesBuilder::default();
    extensions(ClusterHandle { node: node.clone() }, &mut extra);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let max_snapshot = config.max_snapshot_bytes;
    let leader_contact = std::sync::Arc::new(std::sync::Mutex::new(None));
    tasks.push(tokio::spawn(crate::leader_gone::watch(
        node.raft.clone(),
        config.id,
        leader_contact.clone(),
        node.metrics.clone(),
        stop_rx.clone(),
    )));
    let raft_service = RaftServiceServer::new(RaftServiceImpl {
        raft: node.raft.clone(),
        metrics: node.metrics.clone(),
        leader_contact,
        chunks: tokio::sync::Mutex::new(crate::snapshot_chunks::ChunkGuard::new(max_snapshot)),
    })
    .max_decoding_message_size(MAX_RAFT_MESSAGE)
    .max_encoding_message_size(MAX_RAFT_MESSAGE);
    let (api_routes, peer_routes) = match peer_listener {
        Some(listener) => {
            let mut peer = RoutesBuilder::default();
            peer.add_service(raft_service);
            (extra, Some((listener, peer)))
        }
        None => {
            let mut api = extra;
            api.add_service(raft_service);
            (api, None)
        }
    };
    let api_mode = if config.tls.is_some() { Mode::Enforced } else { Mode::Open };
    tasks.push(tokio::spawn(serve_grpc(
        node.clone(),
        grpc_listener,
        stop_rx.clone(),
        api_routes,
        (api_mode, config.tls.clone()),
    )));
    if let Some((listener, routes)) = peer_routes {
        let peer_mode = if config.tls.is_some() { Mode::PeersOnly } else { Mode::Open };
        tasks.push(tokio::spawn(serve_grpc(
            node.clone(),
            listener,
            stop_rx.clone(),
            routes,
            (peer_mode, config.tls.clone()),
        )));
    }
    tasks.push(tokio::spawn(serve_http(node.clone(), http_listener, stop_rx)));

    if config.bootstrap {
        bootstrap(&raft, config.id, &advertise).await?;
    }
    if let Some(seed) = config.join.clone() {
        tasks.push(tokio::spawn(join(raft.clone(), node.peers.clone(), seed, config.id, advertise.clone())));
    }
    tracing::info!(id = config.id, grpc = %grpc_addr, peer = ?peer_addr, http = %http_addr, data_dir = %config.data_dir.display(), "server started");
    Ok(ServerHandle { id: config.id, grpc_addr, peer_addr, http_addr, raft, stop_tx, tasks })
}

async fn bootstrap(raft: &Raft, id: u64, addr: &str) -> Result<(), ClusterError> {
    if raft.is_initialized().await.map_err(|e| ClusterError::Raft(e.to_string()))? {
        tracing::info!(id, "data dir already holds a cluster; --bootstrap ignored");
        return Ok(());
    }
    let members = BTreeMap::from([(id, BasicNode::new(addr))]);
    raft.initialize(members).await.map_err(|e| ClusterError::Raft(e.to_string()))?;
    tracing::info!(id, "bootstrapped a new single-member cluster");
    Ok(())
}

/// Asks the cluster at `seed` to add this server, retrying until it is a member.
async fn join(raft: Raft, peers: crate::peers::Peers, seed: String, id: u64, addr: String) {
    let mut attempt = 0u32;
    loop {
        if raft.metrics().borrow().membership_config.voter_ids().any(|v| v == id) {
            tracing::info!(id, "this server is a voting member");
            return;
        }
        attempt += 1;
        let mut client = ClusterServiceClient::new(peers.channel(&seed));
        match client.add_member(AddMemberRequest { id, addr: addr.clone(), learner_only: false }).await {
            Ok(_) => {
                tracing::info!(id, %seed, "joined the cluster");
                return;
            }
            Err(e) => {
                tracing::warn!(id, %seed, attempt, error = %e.message(), "join failed; retrying");
                tokio::time::sleep(Duration::from_millis(500).min(Duration::from_millis(100) * attempt)).await;
            }
        }
    }
}

/// Serves the object and cluster services (and `routes`: the Raft service where this is
/// the listener Raft travels on, the extensions on the API listener) on `listener`, every
/// call checked under `mode` (Open without TLS: loopback, or --insecure; see
/// ServerConfig::validate).
async fn serve_grpc(
    node: Node,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    routes: RoutesBuilder,
    (mode, tls): (Mode, Option<std::sync::Arc<flotilla_security::Tls>>),
) {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ObjectServiceServer<ObjectServiceImpl>>().await;
    health_reporter.set_serving::<ClusterServiceServer<ClusterServiceImpl>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotilla_api::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("valid descriptor sets");
    let objects =
        ObjectServiceServer::new(ObjectServiceImpl { node: node.clone() }).max_decoding_message_size(MAX_API_MESSAGE);
    let cluster =
        ClusterServiceServer::new(ClusterServiceImpl { node: node.clone() }).max_decoding_message_size(MAX_API_MESSAGE);
    let tenant_keys = TenantKeyServiceServer::new(crate::tenant_keys::TenantKeyServiceImpl {
        objects: ObjectServiceImpl { node: node.clone() },
    });
    let mut routes = routes;
    routes
        .add_service(health_service)
        .add_service(reflection)
        .add_service(objects)
        .add_service(cluster)
        .add_service(tenant_keys);
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .layer(
            AuthorizeLayer::new(mode)
                .with_tokens(std::sync::Arc::new(crate::tokens::StoreTokens { reader: node.reader.clone() })),
        )
        .add_routes(routes.routes());
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let result = match tls {
        Some(tls) => {
            server.serve_with_incoming_shutdown(flotilla_security::incoming::incoming(listener, tls), stopped).await
        }
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            server.serve_with_incoming_shutdown(incoming, stopped).await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

async fn serve_http(node: Node, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let app = crate::http::router(node);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}
