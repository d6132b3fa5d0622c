//! An in-process cluster of real flotilla servers (real Raft, real sled with fsync, real
//! gRPC on loopback ports chosen by the OS), each in its own temp data dir, with optional
//! extra gRPC services per server (the leader's controllers, for the actors' tests).
//! Multi-process tests with the real binary live in `cli/tests/`, where Cargo provides the
//! binary's path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use flotilla_api::pb::cluster_service_client::ClusterServiceClient;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ApplyRequest, DeleteRequest, GetRequest, ListRequest, Object, StatusRequest, StatusResponse};
use flotilla_cluster::{Extensions, ServerConfig, ServerHandle};
use tempfile::TempDir;
use tonic::transport::Channel;

/// Makes the extra services for server `id` each time it starts.
pub type ExtensionsFor = Box<dyn FnMut(u64) -> Extensions + Send>;

/// A cluster of in-process servers with IDs 1..=n.
pub struct TestCluster {
    dir: TempDir,
    servers: Vec<Option<ServerHandle>>,
    addrs: Vec<SocketAddr>,
    tweak: fn(&mut ServerConfig),
    extensions: Option<Mutex<ExtensionsFor>>,
}

/// Fast timeouts so tests fail over quickly.
pub fn fast(config: &mut ServerConfig) {
    config.heartbeat_ms = 50;
    config.election_timeout_min_ms = 200;
    config.election_timeout_max_ms = 400;
    config.request_timeout = Duration::from_secs(5);
}

impl TestCluster {
    /// Starts server 1 (bootstrap) and servers 2..=n (join), and waits until all are voters.
    pub async fn start(n: usize, tweak: fn(&mut ServerConfig)) -> TestCluster {
        Self::start_inner(n, tweak, None).await
    }

    /// Like [`TestCluster::start`], each server also serving `extensions(id)`.
    pub async fn start_with(n: usize, tweak: fn(&mut ServerConfig), extensions: ExtensionsFor) -> TestCluster {
        Self::start_inner(n, tweak, Some(Mutex::new(extensions))).await
    }

    async fn start_inner(n: usize, tweak: fn(&mut ServerConfig), extensions: Option<Mutex<ExtensionsFor>>) -> Self {
        let dir = TempDir::new().expect("temp dir");
        let mut c = TestCluster { dir, servers: Vec::new(), addrs: Vec::new(), tweak, extensions };
        for id in 1..=n as u64 {
            c.add_server(id).await;
        }
        c.wait_voters(n).await;
        c
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("server-{id}"))
    }

    fn config(&self, id: u64, grpc: SocketAddr) -> ServerConfig {
        let mut config = ServerConfig {
            grpc_addr: grpc,
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            bootstrap: id == 1,
            join: if id == 1 { None } else { Some(self.addrs[0].to_string()) },
            ..ServerConfig::new(id, self.data_dir(id))
        };
        (self.tweak)(&mut config);
        config
    }

    async fn start_server(
        &self,
        id: u64,
        config: ServerConfig,
    ) -> Result<ServerHandle, flotilla_cluster::ClusterError> {
        match &self.extensions {
            Some(f) => {
                let ext = (f.lock().expect("extensions lock"))(id);
                flotilla_cluster::start_with(config, ext).await
            }
            None => flotilla_cluster::start(config).await,
        }
    }

    /// Starts server `id` (the next one) on a free port; it joins server 1 unless it is 1.
    pub async fn add_server(&mut self, id: u64) -> SocketAddr {
        assert_eq!(id as usize, self.servers.len() + 1, "servers are added in ID order");
        let config = self.config(id, "127.0.0.1:0".parse().expect("addr"));
        let handle = self.start_server(id, config).await.expect("server starts");
        let addr = handle.grpc_addr;
        self.addrs.push(addr);
        self.servers.push(Some(handle));
        addr
    }

    pub fn addr(&self, id: u64) -> SocketAddr {
        self.addrs[id as usize - 1]
    }

    /// How many servers were started (running or stopped).
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.servers[id as usize - 1].is_some()
    }

    pub fn handle(&self, id: u64) -> &ServerHandle {
        self.servers[id as usize - 1].as_ref().expect("server is running")
    }

    /// The gRPC addresses of the running servers, in ID order.
    pub fn live_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.iter().zip(&self.servers).filter(|(_, s)| s.is_some()).map(|(a, _)| *a).collect()
    }

    /// Stops server `id`, keeping its data dir.
    pub async fn stop(&mut self, id: u64) {
        if let Some(h) = self.servers[id as usize - 1].take() {
            h.shutdown().await;
        }
    }

    /// Restarts a stopped server from its data dir on its old address.
    pub async fn restart(&mut self, id: u64) {
        let mut config = self.config(id, self.addr(id));
        config.join = None;
        let mut last = None;
        for _ in 0..50 {
            match self.start_server(id, config.clone()).await {
                Ok(h) => {
                    self.servers[id as usize - 1] = Some(h);
                    return;
                }
                Err(e) => last = Some(e),
            }
            // The old listener's port may take a moment to be released.
            tokio::time::sleep(Duration::from_millis(100)).await;
            config.bootstrap = false;
        }
        panic!("server {id} did not restart: {last:?}");
    }

    pub async fn objects(&self, id: u64) -> ObjectServiceClient<Channel> {
        ObjectServiceClient::new(channel(self.addr(id)))
    }

    pub async fn status(&self, id: u64) -> StatusResponse {
        let mut c = ClusterServiceClient::new(channel(self.addr(id)));
        c.status(StatusRequest { local: true }).await.expect("status").into_inner()
    }

    /// Waits until `n` voters are configured and a leader is known; returns the leader.
    pub async fn wait_voters(&self, n: usize) -> u64 {
        for _ in 0..300 {
            let s = self.status(1).await;
            if s.leader_id != 0 && s.members.iter().filter(|m| m.voter).count() == n {
                return s.leader_id;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cluster did not reach {n} voters: {:?}", self.status(1).await);
    }

    /// The leader as seen by server `via`, waiting for one to be elected.
    pub async fn leader(&self, via: u64) -> u64 {
        for _ in 0..200 {
            let s = self.status(via).await;
            if s.leader_id != 0 {
                return s.leader_id;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no leader elected");
    }

    /// The object API of the first running server.
    fn first_live_objects(&self) -> ObjectServiceClient<Channel> {
        ObjectServiceClient::new(channel(self.live_addrs()[0]))
    }

    /// Applies `manifest` through the first running server; panics if refused.
    pub async fn apply(&self, manifest: &str) {
        self.first_live_objects()
            .apply(ApplyRequest { manifest: manifest.into(), expected_revision: None })
            .await
            .expect("apply");
    }

    /// Deletes `kind/name` through the first running server; panics if refused.
    pub async fn delete(&self, kind: &str, name: &str) {
        self.first_live_objects()
            .delete(DeleteRequest { kind: kind.into(), name: name.into(), expected_revision: None })
            .await
            .expect("delete");
    }

    /// Every object of `kind` (a linearizable read; empty if it failed).
    pub async fn list(&self, kind: &str) -> Vec<Object> {
        let req = ListRequest { kind: kind.into(), label_selector: String::new(), stale: false };
        match self.first_live_objects().list(req).await {
            Ok(r) => r.into_inner().objects,
            Err(_) => Vec::new(),
        }
    }

    /// `kind/name`, if it exists and the read succeeded.
    pub async fn get(&self, kind: &str, name: &str) -> Option<Object> {
        let req = GetRequest { kind: kind.into(), name: name.into(), stale: false };
        self.first_live_objects().get(req).await.ok().and_then(|r| r.into_inner().object)
    }

    pub async fn shutdown(mut self) {
        for id in 1..=self.servers.len() as u64 {
            self.stop(id).await;
        }
    }
}

/// A lazily connected channel to a server.
pub fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid url")
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// A Model manifest with the given name and replica count.
pub fn model(name: &str, replicas: u32) -> String {
    format!("kind: Model\nmetadata:\n  name: {name}\nspec:\n  engine: sim\n  source: file:///models/{name}\n  replicas: {replicas}\n")
}
